"""Choose the router's threshold on held-out answers, and measure it by replaying the policy.

The threshold is the lowest signal value whose answered set still agrees with the teacher at
`router.quality_target`; when none does, the policy's threshold is None and it escalates
everything (pipeline/router/policy.py decides what a threshold means).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.llm.completion import Completion
from pipeline.router.policy import Policy, replay, signal


@dataclass(frozen=True)
class Coverage:
    """What a policy does on a set of answers: the share it answers, and how good those are."""

    coverage: float
    agreement_answered: float | None


def choose_threshold(completions: list[Completion], agree: list[bool], target: float,
                     signal_name: str = "mean_logprob") -> Policy:
    """Sort by confidence, walk down; the largest confident prefix meeting the target sets it.
    Answers without a signal can never be answered (the policy escalates them), so they are
    only counted in the denominator."""
    read = signal(signal_name)
    points = [(ok, read.score(c)) for c, ok in zip(completions, agree)]
    ranked = sorted((p for p in points if p[1] is not None), key=lambda p: -p[1])
    threshold, agreeing = None, 0
    for i, (ok, score) in enumerate(ranked, start=1):
        agreeing += ok
        if agreeing / i >= target:
            threshold = score
    return Policy(threshold=threshold, signal=signal_name, quality_target=target)


def measure(policy: Policy, completions: list[Completion], agree: list[bool]) -> Coverage:
    """Replay the router's own decisions over these answers."""
    decisions = replay(policy, completions)
    answered = [ok for ok, d in zip(agree, decisions) if d.route == "student"]
    if not completions or not answered:
        return Coverage(0.0, None)
    return Coverage(len(answered) / len(completions), sum(answered) / len(answered))
