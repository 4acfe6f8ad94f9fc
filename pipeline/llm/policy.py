"""The routing decision: answer from the student or escalate to the teacher.

FastAPI-free on purpose (like RouteLLM's Controller): `distill evaluate` replays it offline
over held-out answers to choose and report the threshold, and the server applies the very
same rule to every live answer. One rule, one file format (`router_policy.json`).

A policy is a confidence *signal* read off the student's Completion and a threshold on it.
The threshold comes from evaluation: the lowest signal value at which the student still met
`router.quality_target`. When no threshold met the target, `threshold` is None and the
policy fails closed: every request escalates. A signal the completion cannot provide
(no logprobs) escalates too, and so does an answer cut off at the token limit (a hard gate
before any signal).

Before any signal, the hard gates (pipeline/llm/gates.py: not a label, fails the task's
answer_regex or output_schema, reads as a refusal) escalate an answer whatever its score.

Signals live in a small registry (`SIGNALS`): mean_logprob, min_logprob (one doubtful token is
enough, but a longer answer has a lower minimum: biased against length, tested), p10_logprob
(the 10th-percentile token: not biased by length), logistic (a small logistic regression over
those token features, fitted by evaluation on half of validation), and for classification label_prob / label_margin, read off the label posterior (a softmax
over every label's teacher-forced log-likelihood, `Completion.label_logprobs`, scaled by the
policy's temperature fitted on validation). An answer that is not one of the labels has no
posterior and always escalates. A policy on a label signal says so (`needs_label_scores`),
and its `labels` are what the student backend passes to `generate_batch(score_labels=...)`.

For extraction, field_prob reads the weakest field: each top-level field's value tokens'
log-probability (`Completion.field_logprobs`, pipeline/llm/structured.py), calibrated per field
(p = exp(logprob / T_field), T fitted on validation like the label posterior's temperature), the
minimum over the policy's `fields` (all when none); an escalation names that field. The policy's
`schema` is the JSON Schema the student decodes under, so the server answers as evaluation did.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline.conversation import Shape
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion
from pipeline.llm.gates import Gates
from pipeline.llm.scoring import posterior
from pipeline.llm.structured import weakest_field

Route = Literal["student", "escalate"]


class Signal(Protocol):
    """A confidence score for one student answer: higher means more likely right; None: unknown."""

    name: str
    needs_label_scores: bool

    def score(self, completion: Completion, policy: Policy) -> float | None: ...


class MeanLogprob:
    """Average log-probability of the answer's tokens."""

    name = "mean_logprob"
    needs_label_scores = False

    def score(self, completion: Completion, policy: Policy) -> float | None:
        return completion.mean_logprob


class MinLogprob:
    """Lowest token log-probability of the answer: one doubtful token is enough to doubt it."""

    name = "min_logprob"
    needs_label_scores = False

    def score(self, completion: Completion, policy: Policy) -> float | None:
        return completion.min_logprob


def logprob_quantile(completion: Completion, q: float) -> float | None:
    """The q-quantile of the answer's token log-probabilities (lower end: the doubtful tokens)."""
    values = sorted(v for v in completion.token_logprobs or [] if math.isfinite(v))
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


class P10Logprob:
    """10th-percentile token log-probability: like min_logprob, but one odd token in a long
    answer does not decide alone."""

    name = "p10_logprob"
    needs_label_scores = False

    def score(self, completion: Completion, policy: Policy) -> float | None:
        return logprob_quantile(completion, 0.1)


def token_features(completion: Completion) -> dict[str, float] | None:
    """What the logistic signal weighs; None without token logprobs."""
    # The same finite logprobs feed all three: they are all None or none is.
    mean, minimum, p10 = completion.mean_logprob, completion.min_logprob, logprob_quantile(completion, 0.1)
    if mean is None or minimum is None or p10 is None:
        return None
    return {
        "mean_logprob": mean,
        "min_logprob": minimum,
        "p10_logprob": p10,
        "log_tokens": math.log1p(len(completion.token_logprobs or [])),
    }


class Logistic:
    """P(agrees with the teacher) from a logistic regression over `token_features`; its
    weights (with "intercept") are fitted by evaluation and carried in the policy."""

    name = "logistic"
    needs_label_scores = False

    def score(self, completion: Completion, policy: Policy) -> float | None:
        features = token_features(completion)
        if features is None or not policy.weights:
            return None
        z = policy.weights.get("intercept", 0.0) + sum(policy.weights.get(k, 0.0) * v for k, v in features.items())
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))


def _fold(text: str) -> str:
    # Same folding as Task.normalize_label, so "Track order." reads as the label track_order.
    return re.sub(r"[\s\-]+", "_", text.strip().strip(".!\"'`").lower())


def label_posterior(completion: Completion, temperature: float = 1.0) -> tuple[str, dict[str, float]] | None:
    """(the answered label, the tempered posterior over the labels); None when the answer is
    not a label or was not scored."""
    scores = completion.label_logprobs
    if not scores:
        return None
    by_fold = {_fold(label): label for label in scores}
    answered = by_fold.get(_fold(completion.text))
    if answered is None:
        return None
    return answered, posterior(scores, temperature)


class LabelProb:
    """Posterior probability of the answered label."""

    name = "label_prob"
    needs_label_scores = True

    def score(self, completion: Completion, policy: Policy) -> float | None:
        found = label_posterior(completion, policy.temperature)
        return None if found is None else found[1][found[0]]


class LabelMargin:
    """Posterior of the answered label minus the best other label's (negative: not the top)."""

    name = "label_margin"
    needs_label_scores = True

    def score(self, completion: Completion, policy: Policy) -> float | None:
        found = label_posterior(completion, policy.temperature)
        if found is None:
            return None
        answered, probs = found
        others = [p for label, p in probs.items() if label != answered]
        return probs[answered] - max(others, default=0.0)


class FieldProb:
    """Calibrated probability of the weakest field's value (structured answers): one doubtful
    field is enough to doubt the record, however long the rest is."""

    name = "field_prob"
    needs_label_scores = False

    def score(self, completion: Completion, policy: Policy) -> float | None:
        found = weakest_field(completion.field_logprobs, policy.field_temperatures, policy.fields)
        return None if found is None else found[1]


SIGNALS: dict[str, Signal] = {
    s.name: s for s in (MeanLogprob(), MinLogprob(), P10Logprob(), Logistic(), LabelProb(), LabelMargin(), FieldProb())
}


def signal(name: str) -> Signal:
    if name not in SIGNALS:
        raise DistillError(f"unknown router signal '{name}'; known: {', '.join(SIGNALS)}")
    return SIGNALS[name]


@dataclass(frozen=True)
class Decision:
    route: Route
    score: float | None
    reason: str


@dataclass(frozen=True)
class Policy:
    """Answer from the student when `signal(completion) >= threshold`; else escalate.

    threshold None: no threshold met the quality target, so everything escalates (fail closed).
    threshold -inf (`Policy.student_only()`): never escalate, for serving without a teacher."""

    threshold: float | None
    signal: str = "mean_logprob"
    quality_target: float | None = None
    labels: tuple[str, ...] | None = None  # label signals: the set to score (generate_batch score_labels)
    temperature: float = 1.0  # label signals: posterior temperature, fitted on validation
    gates: Gates = field(default_factory=Gates)  # answers escalated whatever their score
    weights: dict[str, float] | None = None  # the logistic signal's coefficients, fitted on validation
    decode: str = "generate"  # how the student answers (router.decode): generate, or label_posterior
    # What the student was trained and evaluated on, so what the router feeds it: the conversation
    # as sent, or its user and assistant turns (pipeline/conversation.py student_messages). A
    # policy written before this field existed was evaluated on the user turn alone: "user".
    student_input: Shape = "user"
    schema: dict[str, Any] | None = None  # the JSON Schema the student decodes under (structured decoding)
    fields: tuple[str, ...] | None = None  # field_prob: the fields it reads (None: every field)
    field_temperatures: dict[str, float] | None = None  # field_prob: per field ("*": the rest), from validation

    def __post_init__(self) -> None:
        read = signal(self.signal)  # unknown signal names fail at construction, not per request
        if read.needs_label_scores and not self.labels:
            raise DistillError(f"router signal '{self.signal}' needs the task's labels in the policy")
        if self.decode not in ("generate", "label_posterior"):
            raise DistillError(f"router policy decode must be generate or label_posterior, not '{self.decode}'")
        if self.decode == "label_posterior" and not self.labels:
            raise DistillError("router policy decode=label_posterior needs the task's labels in the policy")
        if not self.temperature > 0:
            raise DistillError(f"router policy temperature must be > 0, got {self.temperature}")
        if self.signal == "logistic" and not self.weights:
            raise DistillError("router signal 'logistic' needs its fitted weights in the policy")
        if self.student_input not in ("conversation", "user"):
            raise DistillError(f"router policy student_input must be conversation or user, not '{self.student_input}'")

    @property
    def needs_label_scores(self) -> bool:
        """The student backend must pass `score_labels=list(policy.labels)` to generate_batch."""
        return signal(self.signal).needs_label_scores or self.decode == "label_posterior"

    @classmethod
    def student_only(cls, signal_name: str = "mean_logprob", student_input: Shape = "user") -> Policy:
        # Labels and logistic weights come only with an evaluated policy: report mean_logprob then.
        if signal(signal_name).needs_label_scores or signal_name == "logistic":
            signal_name = "mean_logprob"
        return cls(threshold=-math.inf, signal=signal_name, student_input=student_input)

    def gate_failure(self, completion: Completion) -> str | None:
        """The hard gate this answer fails (escalated whatever its score), or None."""
        if not completion.stopped:  # an answer cut off at the token limit is not an answer
            return f"answer ended by {completion.finish_reason}, not by itself"
        if self.labels and _fold(completion.text) not in {_fold(label) for label in self.labels}:
            return "answer is not one of the task's labels"
        return self.gates.failure(completion.text)

    def score(self, completion: Completion) -> float | None:
        """The signal as the policy reads it; None where it escalates regardless (a gate, no signal)."""
        if self.gate_failure(completion) is not None:
            return None
        return signal(self.signal).score(completion, self)

    def decide(self, completion: Completion) -> Decision:
        score = signal(self.signal).score(completion, self)
        if self.threshold is None:
            return Decision("escalate", score, "no threshold met the quality target: every request escalates")
        if self.threshold == -math.inf:
            return Decision("student", score, "student-only policy")
        gated = self.gate_failure(completion)
        if gated is not None:
            return Decision("escalate", score, gated)
        if score is None:
            return Decision("escalate", None, f"no {self.signal} on the answer (not a label, or not scored)")
        what = self._what(completion, score)
        if score < self.threshold:
            return Decision("escalate", score, f"{what} < threshold {self.threshold:.3f}")
        return Decision("student", score, f"{what} >= threshold {self.threshold:.3f}")

    def _what(self, completion: Completion, score: float) -> str:
        """The score as the reason states it: the weakest field by name for field_prob."""
        if self.signal == "field_prob":
            found = weakest_field(completion.field_logprobs, self.field_temperatures, self.fields)
            assert found is not None  # a field_prob score is the weakest field's probability
            name, _ = found
            return f"`{name}` p={score:.3f}"
        return f"{self.signal} {score:.3f}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels) if self.labels else None
        data["fields"] = list(self.fields) if self.fields else None
        data["gates"] = self.gates.to_json()
        if data["threshold"] == -math.inf:
            raise DistillError("a student-only policy is not written to disk; it exists only at serve time")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        labels = data.get("labels")
        return cls(
            threshold=data["threshold"],
            signal=data.get("signal", "mean_logprob"),
            quality_target=data.get("quality_target"),
            labels=tuple(labels) if labels else None,
            temperature=data.get("temperature") or 1.0,
            gates=Gates.from_json(data.get("gates")),
            weights=data.get("weights"),
            decode=data.get("decode", "generate"),
            schema=data.get("schema"),
            fields=tuple(data["fields"]) if data.get("fields") else None,
            field_temperatures=data.get("field_temperatures"),
            student_input=data.get("student_input", "user"),
        )

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DistillError(f"{path}: not a router policy ({type(err).__name__}: {err})") from None


def replay(policy: Policy, completions: list[Completion]) -> list[Decision]:
    """The router's decision for each held-out answer, exactly as the server would make it."""
    return [policy.decide(c) for c in completions]
