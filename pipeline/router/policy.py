"""The routing decision: answer from the student or escalate to the teacher.

FastAPI-free on purpose (like RouteLLM's Controller), so `distill evaluate` can replay it
offline over held-out generations and the server can apply the very same rule. The
threshold comes from evaluation: the lowest mean token log-probability at which the
student still met `router.quality_target`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


class Scored(Protocol):
    """Anything carrying the student's confidence: pipeline.models.Generation, backends.Completion."""

    mean_logprob: float


@dataclass(frozen=True)
class Decision:
    route: Literal["student", "escalate"]
    reason: str


@dataclass(frozen=True)
class Policy:
    """Escalate when the student's mean log-probability falls below `threshold`; None never escalates."""

    threshold: float | None = None

    def decide(self, generation: Scored) -> Decision:
        if self.threshold is None:
            return Decision("student", "no threshold set")
        score = generation.mean_logprob
        if score < self.threshold:
            return Decision("escalate", f"mean_logprob {score:.3f} < threshold {self.threshold:.3f}")
        return Decision("student", f"mean_logprob {score:.3f} >= threshold {self.threshold:.3f}")
