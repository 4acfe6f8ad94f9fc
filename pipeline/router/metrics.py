"""Prometheus metrics of one router app (`GET /metrics`), via prometheus-client.

    distill serve RECIPE &  curl http://127.0.0.1:8000/metrics

Each app gets its own CollectorRegistry (no module-level globals), so several apps in one
process (tests, the bench) never share or collide on counters.

The confidence histogram is one per policy signal (`distill_confidence_<signal>`), each with
buckets on its own scale: a log-probability is at most 0, a label probability lies in [0, 1]
and a label margin in [-1, 1]; one set of buckets would put one family's readings in +Inf.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the app)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Token log-probabilities: a confident answer is near 0, a random model's near -10.
_LOGPROB_BUCKETS = (-8.0, -4.0, -2.0, -1.0, -0.5, -0.25, -0.1, -0.05, 0.0)
_PROBABILITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_MARGIN_BUCKETS = (-0.5, -0.25, 0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
CONFIDENCE_BUCKETS = {
    "mean_logprob": _LOGPROB_BUCKETS,
    "min_logprob": _LOGPROB_BUCKETS,
    "p10_logprob": _LOGPROB_BUCKETS,
    "logistic": _PROBABILITY_BUCKETS,
    "label_prob": _PROBABILITY_BUCKETS,
    "label_margin": _MARGIN_BUCKETS,
}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "distill_requests", "Answered requests by route and mode.", ["route", "mode"], registry=r
        )
        self.decisions = Counter(
            "distill_policy_decisions", "Policy decisions on student answers.", ["decision"], registry=r
        )
        self.escalation_rate = Gauge("distill_escalation_rate", "Share of policy decisions that escalated.", registry=r)
        self.confidence: dict[str, Histogram] = {}  # per signal, made at its first reading
        self.latency = Histogram(
            "distill_latency_seconds",
            "Latency by phase: queue, student, teacher, total.",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("distill_tokens", "Tokens by system and kind.", ["system", "kind"], registry=r)
        # A gauge read off the teacher's ledger at scrape time: the ledger is the one record of spend.
        self.teacher_usd = Gauge("distill_teacher_spent_usd", "US$ spent on teacher calls since start.", registry=r)
        self.saved_usd = Counter(
            "distill_saved_usd_estimate",
            "Estimated US$ the teacher would have charged for "
            "the requests the student answered (teacher price, estimated prompt tokens).",
            registry=r,
        )
        self.errors = Counter("distill_errors", "Errors by kind.", ["kind"], registry=r)
        self.rejected = Counter(
            "distill_rejected", "Requests refused before work (queue full).", ["reason"], registry=r
        )
        self.queue = Gauge("distill_in_flight", "Requests admitted and not yet answered.", registry=r)
        self.agreement = Counter(
            "distill_shadow_pairs", "Shadowed/escalated pairs by student-teacher agreement.", ["agree"], registry=r
        )
        self.rolling_agreement = Gauge(
            "distill_rolling_agreement",
            "Shadowed student-teacher agreement over the rollback window (answers the policy would keep).",
            registry=r,
        )
        self.rolled_back = Gauge(
            "distill_rolled_back", "1 once agreement fell below target and mode went off.", registry=r
        )
        # Read off the logs at scrape time, as teacher_usd off the ledger.
        self.log_failures = Gauge(
            "distill_log_write_failures",
            "Records a log could not write (disk full, ...); the answer was still sent.",
            ["log"],
            registry=r,
        )
        self._decided = 0
        self._escalated = 0

    def decided(self, escalate: bool, score: float | None, signal: str = "mean_logprob") -> None:
        self._decided += 1
        self._escalated += int(escalate)
        self.decisions.labels("escalate" if escalate else "student").inc()
        self.escalation_rate.set(self._escalated / self._decided)
        if score is not None:
            self._confidence(signal).observe(score)

    def _confidence(self, signal: str) -> Histogram:
        if signal not in self.confidence:
            self.confidence[signal] = Histogram(
                f"distill_confidence_{signal}",
                f"The policy's {signal} signal per decision.",
                buckets=CONFIDENCE_BUCKETS.get(signal, _LOGPROB_BUCKETS),
                registry=self.registry,
            )
        return self.confidence[signal]

    def render(self) -> bytes:
        return generate_latest(self.registry)
