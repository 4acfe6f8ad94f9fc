"""Choose the router's threshold with a guarantee, and measure it by replaying the policy.

    .venv/bin/pytest -q tests/llm/test_policy.py tests/evaluation/test_evaluate_threshold.py

The threshold keeps the most traffic on the student subject to the one-sided Clopper-Pearson
lower bound (at `eval.confidence`, 95% by default) on the answered set's agreement with the
teacher being >= `router.quality_target`. Candidate thresholds are tested in a fixed order,
most confident first, starting where the answered set is large enough for the bound to reach
the target at all, and the walk stops at the first candidate that fails (fixed-sequence
testing, as in Learn-then-Test): the order depends on the scores only, never on which
answers agree, so the guarantee holds for the threshold the walk returns, not just for each
candidate alone. When no candidate passes, the policy's threshold is None and it escalates
everything (pipeline/llm/policy.py decides what a threshold means).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from pipeline.llm.completion import Completion
from pipeline.llm.policy import Policy, replay
from pipeline.stats import clopper_pearson_lower, examples_needed


@dataclass(frozen=True)
class Coverage:
    """What a policy does on a set of answers: the share it answers, and how good those are."""

    coverage: float
    agreement_answered: float | None
    answered: int = 0
    agreeing: int = 0
    total: int = 0

    @property
    def system_agreement(self) -> float | None:
        """Answered by the student when confident, by the teacher (agreeing with itself) otherwise."""
        if not self.total:
            return None
        return (self.agreeing + self.total - self.answered) / self.total


@dataclass(frozen=True)
class Choice:
    """The chosen policy and the evidence behind it, for the report and router_policy.json."""

    policy: Policy
    bound: float | None  # Clopper-Pearson lower bound on answered agreement at the threshold
    answered: int
    agreeing: int
    examples: int  # calibration examples
    examples_needed: int  # fewest answered examples that could reach the target at all
    reason: str  # "met" | "too_few_examples" | "target_not_met"

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("policy")
        return data


def scores_of(completions: list[Completion], policy: Policy) -> list[float | None]:
    """The signal as the policy reads it; None where the policy escalates regardless (a hard gate, no signal)."""
    return [policy.score(c) for c in completions]


def choose_threshold(
    completions: list[Completion],
    agree: list[bool],
    target: float,
    template: Policy | None = None,
    confidence: float = 0.95,
) -> Choice:
    """Walk the distinct signal values from the most confident down (fixed-sequence testing);
    the lowest value whose answered set's lower bound still meets the target is the threshold.
    `template` is the policy without its threshold (signal, labels, temperature, gates, weights).
    Answers without a signal, or failing a hard gate, are never answered (the policy escalates them)."""
    template = template or Policy(threshold=None)
    scores = scores_of(completions, template)
    ranked = sorted(((s, ok) for s, ok in zip(scores, agree) if s is not None), key=lambda p: -p[0])
    needed = examples_needed(target, confidence)
    best: tuple[float, float, int, int] | None = None
    agreeing = 0
    for i, (score, ok) in enumerate(ranked, start=1):
        agreeing += ok
        if i < len(ranked) and ranked[i][0] == score:
            continue  # ties: a threshold answers every answer at its value, so test whole groups
        if i < needed:
            continue  # the bound cannot reach the target on fewer answers: not a candidate
        bound = clopper_pearson_lower(agreeing, i, confidence)
        if bound < target:
            break
        best = (score, bound, i, agreeing)
    if best is None:
        reason = "too_few_examples" if len(ranked) < needed else "target_not_met"
        return Choice(
            replace(template, threshold=None, quality_target=target), None, 0, 0, len(completions), needed, reason
        )
    score, bound, answered, agreeing = best
    return Choice(
        replace(template, threshold=score, quality_target=target),
        bound,
        answered,
        agreeing,
        len(completions),
        needed,
        "met",
    )


def measure(policy: Policy, completions: list[Completion], agree: list[bool]) -> Coverage:
    """Replay the router's own decisions over these answers."""
    decisions = replay(policy, completions)
    answered = [ok for ok, d in zip(agree, decisions) if d.route == "student"]
    if not completions or not answered:
        return Coverage(0.0, None, 0, 0, len(completions))
    return Coverage(
        len(answered) / len(completions), sum(answered) / len(answered), len(answered), sum(answered), len(completions)
    )


def agreement_at_coverage(curve: list[dict], coverage: float) -> float | None:
    """Agreement on the answers kept when the most confident `coverage` share of prompts is kept
    (the largest curve point not above it; ties in the signal are kept or dropped together)."""
    kept = [row for row in curve if row["coverage"] <= coverage + 1e-9]
    return kept[-1]["agreement_answered"] if kept else None


def sweep(scores: list[float | None], agree: list[bool]) -> list[dict]:
    """Coverage, answered and system agreement at every distinct threshold (for the curves)."""
    n = len(scores)
    ranked = sorted(((s, ok) for s, ok in zip(scores, agree) if s is not None), key=lambda p: -p[0])
    rows, agreeing = [], 0
    for i, (score, ok) in enumerate(ranked, start=1):
        agreeing += ok
        if i < len(ranked) and ranked[i][0] == score:
            continue
        rows.append(
            {
                "threshold": score,
                "coverage": i / n,
                "agreement_answered": agreeing / i,
                "system_agreement": (agreeing + n - i) / n,
            }
        )
    return rows
