"""The loop: every teacher answer the router obtains becomes a training record.

    distill serve RECIPE                                   (appends to serve.escalations)
    distill capture RECIPE teacher.spec=logs:.distill/escalations.jsonl   (imports it)

Records use the capture record format (`{"id", "messages": [...the conversation as the client
sent it, assistant], "meta"}`, with the request's answer-changing parameters in meta.request),
so `logs:` imports them with zero rejects and the next `make distill` learns from them. How the
file is written (one write per record, torn lines repaired, 0600, rotation that never
overwrites, personal data scrubbed, a full disk never failing the request) is record_log.py's.
Nothing secret is written: no headers, no keys, only the conversation, the answers and routing
facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline.artifacts import sha256_json
from pipeline.llm.completion import Completion
from pipeline.router.record_log import RecordLog


@dataclass(frozen=True)
class Escalation:
    request_id: str
    conversation: list[dict[str, str]]  # every turn as the client sent it
    teacher: Completion  # an answer without error
    route: str  # what the client got: teacher | student | student-fallback
    reason: str
    policy: str  # policy hash
    confidence: float | None = None
    student: Completion | None = None  # None: the student was not asked (mode off / canary-out)
    model_version: str | None = None  # the registry version that served, when serving by alias
    # serve.tiers: every step before the teacher (student, then each tier: outcome, confidence,
    # reason, policy hash, answer); None without tiers, and the record has no meta.tiers then.
    tiers: tuple[dict[str, Any], ...] | None = None
    request: dict[str, Any] | None = None  # the sent parameters that change the answer (meta.request)

    def record(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "teacher": self.teacher.source,
            # The teacher spec's provider: `logs` marks a dataset's answer standing in for a teacher.
            "teacher_source": self.teacher.source.partition(":")[0],
            "source": "router",
            "route": self.route,
            "confidence": self.confidence,
            "reason": self.reason,
            "policy": self.policy,
            "model_version": self.model_version,
            "request": self.request or {},
            "prompt_sha": sha256_json(self.conversation)[:16],
            "student_answer": self.student.text if self.student else None,
            "agree": agrees(self.student, self.teacher) if self.student else None,
            "cost_usd": self.teacher.cost_usd,
            "latency_ms": self.teacher.latency_ms,
            "usage": self.teacher.usage,
            "finish_reason": self.teacher.finish_reason,
            "created_at": self.teacher.created_at,
        }
        if self.tiers is not None:
            meta["tiers"] = list(self.tiers)
        messages = [*self.conversation, {"role": "assistant", "content": self.teacher.text}]
        return {"id": self.request_id, "messages": messages, "meta": meta}


class EscalationLog(RecordLog):
    """One record per teacher answer (record_log.RecordLog writes it); safe from several threads."""

    def append(self, escalation: Escalation) -> bool:  # type: ignore[override]
        """False when the record could not be written (counted in `failed`, logged); never raises."""
        return super().append(escalation.record())


def agrees(student: Completion, teacher: Completion) -> bool:
    """Same answer up to case, spacing and end punctuation (how evaluation folds labels)."""
    return _fold(student.text) == _fold(teacher.text)


def _fold(text: str) -> str:
    return re.sub(r"[\s\-]+", "_", text.strip().strip(".!\"'`").lower())
