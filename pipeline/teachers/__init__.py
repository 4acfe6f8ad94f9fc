"""Teachers: one interface over every source of labels.

Spec strings pick one: `local:<model-ref>` runs a transformers model in-process.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from pipeline.errors import DistillError


@dataclass
class Completion:
    text: str
    usage: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0
    latency_ms: int = 0
    logprobs: float | None = None  # mean token log-probability when the teacher gives one
    finish_reason: str = "stop"
    error: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Teacher(Protocol):
    spec: str

    def identity(self) -> dict[str, Any]:
        """Provider, model and generation params: everything that changes the answer (the cache key)."""

    async def complete_batch(self, conversations: list[list[dict]]) -> list[Completion]: ...


def build_teacher(spec: str, cfg) -> Teacher:
    """Turn a spec string and our TeacherConfig into a teacher. Nothing is loaded until first use."""
    provider, sep, ref = spec.partition(":")
    if not sep or not ref:
        raise DistillError(f"teacher spec '{spec}' must look like provider:model, e.g. local:{ref or 'model'}")
    if provider == "local":
        from pipeline.teachers.local import LocalTeacher

        return LocalTeacher(ref, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    raise DistillError(f"teacher provider '{provider}' is not available; known: local")


def run_sync(coro):
    return asyncio.run(coro)
