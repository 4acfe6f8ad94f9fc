"""The routing decision: answer from the student or escalate to the teacher.

FastAPI-free on purpose (like RouteLLM's Controller): `distill evaluate` replays it offline
over held-out answers to choose and report the threshold, and the server applies the very
same rule to every live answer. One rule, one file format (`router_policy.json`).

A policy is a confidence *signal* read off the student's Completion and a threshold on it.
The threshold comes from evaluation: the lowest signal value at which the student still met
`router.quality_target`. When no threshold met the target, `threshold` is None and the
policy fails closed: every request escalates. A signal the completion cannot provide
(no logprobs) escalates too.

Signals live in a small registry (`SIGNALS`), so another decision rule (label posterior,
margin, a logistic model) is one class with a `score(completion)` method.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline.errors import DistillError
from pipeline.llm.completion import Completion

Route = Literal["student", "escalate"]


class Signal(Protocol):
    """A confidence score for one student answer: higher means more likely right; None: unknown."""

    name: str

    def score(self, completion: Completion) -> float | None: ...


class MeanLogprob:
    """Average log-probability of the answer's tokens."""

    name = "mean_logprob"

    def score(self, completion: Completion) -> float | None:
        return completion.mean_logprob


SIGNALS: dict[str, Signal] = {s.name: s for s in (MeanLogprob(),)}


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

    def __post_init__(self) -> None:
        signal(self.signal)  # unknown signal names fail at construction, not per request

    @classmethod
    def student_only(cls, signal_name: str = "mean_logprob") -> Policy:
        return cls(threshold=-math.inf, signal=signal_name)

    def decide(self, completion: Completion) -> Decision:
        score = signal(self.signal).score(completion)
        if self.threshold is None:
            return Decision("escalate", score, "no threshold met the quality target: every request escalates")
        if score is None:
            if self.threshold == -math.inf:
                return Decision("student", None, "student-only policy")
            return Decision("escalate", None, f"no {self.signal} on the answer")
        if score < self.threshold:
            return Decision("escalate", score, f"{self.signal} {score:.3f} < threshold {self.threshold:.3f}")
        return Decision("student", score, f"{self.signal} {score:.3f} >= threshold {self.threshold:.3f}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["threshold"] == -math.inf:
            raise DistillError("a student-only policy is not written to disk; it exists only at serve time")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        return cls(threshold=data["threshold"], signal=data.get("signal", "mean_logprob"),
                   quality_target=data.get("quality_target"))

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DistillError(f"{path}: not a router policy ({type(err).__name__}: {err})") from None


def replay(policy: Policy, completions: list[Completion]) -> list[Decision]:
    """The router's decision for each held-out answer, exactly as the server would make it."""
    return [policy.decide(c) for c in completions]
