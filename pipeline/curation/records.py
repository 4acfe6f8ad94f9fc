"""The example record that flows through curation, and step 1: normalise.

An example is a plain dict (it ends up in `datasets.Dataset.from_list`):
`id, messages, completion, label, gold, teacher, teacher_logprob, confidence, teacher_label_probs`
(`messages`: the conversation before the answer as the app sent it, normalised; the teacher's
distribution over the labels as JSON, "" when it gave none) plus working fields: `student` (what
the student sees of the conversation, `pipeline.conversation.student_messages`), `prompt` (its
user and assistant turns as one text: what dedup, decontamination, selection and the card
compare and show), `samples` (one per teacher answer to this prompt), `finish_reason`, `sample`,
`gold_agrees`, token counts.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from pipeline.config import CurateConfig
from pipeline.conversation import SYSTEM_ROLES, Shape, dialogue_text, student_messages
from pipeline.llm.scoring import posterior
from pipeline.task import Task, agrees, gold_text

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Removal:
    """One example a step dropped (or changed), with why."""

    reason: str
    id: str
    prompt: str
    answer: str
    detail: str = ""


def removal(ex: dict, reason: str, detail: str = "") -> Removal:
    return Removal(reason, ex["id"], ex["prompt"], ex["completion"], detail)


def normalize_text(text: str) -> str:
    """Mojibake repaired (ftfy: "donâ€™t" -> "don’t", text decoded with the wrong codec somewhere
    upstream), then NFKC (full-width forms, ligatures, odd spaces) and collapsed whitespace.
    Curly quotes are kept: they are what users type, and what the served student will see."""
    import ftfy

    repaired = ftfy.fix_text(text, uncurl_quotes=False)
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", repaired)).strip()


def mean_logprob(value: Any) -> float | None:
    """The teacher's mean token log-probability, whatever shape the capture recorded it in:
    a number, a list of numbers, or a list of {"logprob": x} entries (OpenAI style)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, list) and value:
        entries = [v.get("logprob") if isinstance(v, dict) else v for v in value]
        numbers = [float(v) for v in entries if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return sum(numbers) / len(numbers) if numbers else None
    return None


def read_conversation(record: dict) -> tuple[list[dict], str]:
    """A capture record's conversation (every turn before the answer) and its answer, normalised;
    whatever is missing comes back empty for step 1 to judge."""
    turns = [m for m in record.get("messages") or [] if isinstance(m, dict)]
    answer = ""
    if turns and turns[-1].get("role") == "assistant":
        answer = _text(turns.pop()["content"])
    return [{"role": str(m.get("role")), "content": _text(m.get("content"))} for m in turns], answer


def _text(content) -> str:
    return normalize_text(content) if isinstance(content, str) else ""


def with_student_view(ex: dict, shape: Shape) -> dict:
    """Add what the student sees of the example's conversation, and its dialogue as one text."""
    ex["student"] = student_messages(ex["messages"], shape)
    ex["prompt"] = dialogue_text(ex["messages"]) if _ends_with_user(ex["messages"]) else ""
    return ex


def student_text(ex: dict) -> str:
    """Every turn the student reads, as one text: what decontamination looks for elsewhere."""
    return "\n".join(m["content"] for m in ex["student"])


def student_system(ex: dict) -> str:
    """The system prompt the student reads ('' when it reads none): part of what makes two examples the same."""
    return "\n\n".join(m["content"] for m in ex["student"] if m["role"] in SYSTEM_ROLES)


def _ends_with_user(messages: list[dict]) -> bool:
    return bool(messages) and messages[-1]["role"] == "user"


def to_example(record: dict, task: Task, shape: Shape) -> dict:
    """A capture record -> a working example with one sample (normalised text)."""
    meta = record.get("meta") or {}
    messages, answer = read_conversation(record)
    label = task.normalize_label(answer) if task.kind == "classification" and answer else None
    gold = gold_text(meta.get("gold"))
    logprob = mean_logprob(meta.get("logprobs"))
    sample = {
        "id": str(record.get("id", "")),
        "completion": answer,
        "label": label,
        "logprob": logprob,
        "finish_reason": meta.get("finish_reason") or "stop",
    }
    return with_student_view(
        {
            "id": str(record.get("id", "")),
            "messages": messages,
            "completion": answer,
            "label": label or "",
            "gold": gold,
            "teacher": str(meta.get("teacher") or ""),
            "teacher_logprob": logprob,
            "confidence": 1.0,
            "weight": example_weight(meta),
            # Each label's log-likelihood (a local teacher with teacher.label_distribution) -> its posterior.
            "label_probs": posterior(meta["label_logprobs"])
            if task.kind == "classification" and meta.get("label_logprobs")
            else None,
            "finish_reason": sample["finish_reason"],
            "error": meta.get("error"),
            "sample": meta.get("sample"),
            "gold_agrees": bool(gold)
            and (agrees(task, answer, gold) if task.kind == "extraction" else (label or answer) == gold),
            "samples": [sample],
        },
        shape,
    )


def example_weight(meta: dict) -> int:
    """Times finetune trains on the example per epoch (`meta.weight`, set by `retrain.escalation_weight`)."""
    weight = meta.get("weight", 1)
    if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
        raise ValueError(f"meta.weight must be a whole number >= 1, got {weight!r}")
    return weight


def step_normalise(
    records: list[dict], task: Task, cfg: CurateConfig, shape: Shape
) -> tuple[list[dict], list[Removal]]:
    """Step 1: normalise text; drop failed calls, empty sides (a conversation must end with a
    user turn), refusals, cut-off answers."""
    refusals = [re.compile(p, re.IGNORECASE) for p in cfg.refusal_patterns]
    kept, removed = [], []
    for record in records:
        ex = to_example(record, task, shape)
        reason, detail = _normalise_verdict(ex, refusals, cfg.drop_truncated)
        if reason:
            removed.append(removal(ex, reason, detail))
        else:
            kept.append(ex)
    return kept, removed


def _normalise_verdict(ex: dict, refusals: list[re.Pattern], drop_truncated: bool) -> tuple[str, str]:
    if ex["error"]:
        return "failed_call", str(ex["error"])[:120]
    if not ex["prompt"]:
        return "empty_prompt", ""
    if not ex["completion"]:
        return "empty_answer", ""
    hit = next((p for p in refusals if p.search(ex["completion"])), None)
    if hit:
        return "refusal", f"matched /{hit.pattern}/"
    # A cut-off answer that already is a whole label lost nothing; anything else is incomplete.
    if drop_truncated and ex["finish_reason"] == "length" and not ex["label"]:
        return "truncated", "finish_reason=length"
    return "", ""
