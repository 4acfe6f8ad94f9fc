"""Serving modes (`serve.mode`): how much traffic the router lets the student answer.

    distill serve RECIPE serve.mode=canary:10

    off          the teacher answers everything (the student is not asked)
    shadow       the teacher answers; the student runs in the background and both are logged
    canary:<pct> that share of requests is routed (student first, escalate on low confidence);
                 the rest are teacher-only. Deterministic: the same `user` (else request id)
                 always lands on the same side, so one user never flips between systems.
    live         every request is routed

FastAPI-free, so the bench and tests can check the split without a server.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import DistillError

Kind = Literal["off", "shadow", "canary", "live"]
_BUCKETS = 10_000  # canary resolution: 0.01 %


@dataclass(frozen=True)
class Mode:
    kind: Kind
    percent: float = 100.0  # canary share; 100 for live, 0 for off/shadow

    @classmethod
    def parse(cls, text: str) -> Mode:
        if text == "off":
            return cls("off", 0.0)
        if text == "shadow":
            return cls("shadow", 0.0)
        if text == "live":
            return cls("live", 100.0)
        if text.startswith("canary:"):
            try:
                percent = float(text.split(":", 1)[1])
            except ValueError:
                percent = -1.0
            if 0 <= percent <= 100:
                return cls("canary", percent)
        raise DistillError(f"serve.mode '{text}' is not one of off, shadow, canary:<0-100>, live")

    def routed(self, key: str) -> bool:
        """Whether this request goes through the student (else teacher-only)."""
        if self.kind == "live":
            return True
        if self.kind != "canary":
            return False
        # sha256, not hash(): Python salts str hashes per process, and replicas must agree.
        bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % _BUCKETS
        return bucket < self.percent * _BUCKETS / 100

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "live"

    def __str__(self) -> str:
        return f"canary:{self.percent:g}" if self.kind == "canary" else self.kind


class Rollback:
    """Switches the router to `off` when the student stops agreeing with the teacher.

    Fed one bool per shadowed request the policy would have let the student answer (the
    requests the quality target is about); once `window` of them are in, a share agreeing
    below `target` trips it, for good: turning the student back on is a person's decision
    (a new policy, a restart)."""

    def __init__(self, target: float | None, window: int):
        from collections import deque

        self.target = target
        self.recent: deque[bool] = deque(maxlen=window)
        self.tripped = False

    @property
    def agreement(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def observe(self, agree: bool) -> bool:
        """Record one pair; True exactly once, when this pair trips the rollback."""
        if self.target is None or self.tripped:
            return False
        self.recent.append(agree)
        if len(self.recent) == self.recent.maxlen:
            agreement = self.agreement
            assert agreement is not None  # a pair was just recorded (the window is >= 1)
            if agreement < self.target:
                self.tripped = True
                return True
        return False
