"""The user's own held-out file (`eval.file`): prompts, optional gold, and the teacher's answers.

    distill evaluate RECIPE eval.file=data/my_eval.jsonl

JSONL (a prompt field, or a chat conversation in `messages`, kept whole; an answer it ends with
is dropped, the teacher answers anew) or CSV. Curate keeps these prompts out of training (it
reads the same `eval.file`). The teacher answers them through the teacher service, so its
answers are cached, costed and budgeted like capture's.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from pipeline.artifacts import read_jsonl
from pipeline.conversation import read_messages, user_turn
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion
from pipeline.task import Task, gold_text

log = logging.getLogger(__name__)


def _conversation_of(record: dict, field: str) -> list[dict] | None:
    """The row's conversation, or None when it has none the student could answer."""
    text = record.get(field)
    if isinstance(text, str):
        return user_turn(text.strip()) if text.strip() else None
    try:
        messages = read_messages(record.get("messages"))
    except ValueError:  # no messages, or content the student cannot read (Unsupported)
        return None
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages if messages and messages[-1]["role"] == "user" else None


def read_heldout(path: Path, prompt_field: str, gold_field: str | None) -> list[dict]:
    """Rows {id, messages, gold}; a file without a single prompt is an error naming the field."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DistillError(f"{path}: eval.file not found")
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    else:
        records = read_jsonl(path)
    rows = []
    for i, record in enumerate(records):
        messages = _conversation_of(record, prompt_field)
        if messages:
            gold = record.get(gold_field) if gold_field else None
            rows.append({"id": str(record.get("id") or f"heldout-{i}"), "messages": messages, "gold": gold_text(gold)})
    if not rows:
        raise DistillError(f"{path}: no prompts (expected a '{prompt_field}' field/column or chat 'messages')")
    if len(rows) < len(records):
        log.warning(
            "%s: %d of %d rows have no prompt or conversation the student can read; skipped",
            path,
            len(records) - len(rows),
            len(records),
        )
    return rows


def teacher_answers(recipe, task: Task, rows: list[dict]) -> tuple[list[dict], float]:
    """Each row with the teacher's answer as `completion`, and what the calls cost (cached: free)."""
    from pipeline.teachers.service import TeacherService

    if recipe.teacher.spec.startswith("logs:"):
        raise DistillError(
            "eval.file needs a teacher that can answer new prompts; teacher.spec is "
            f"{recipe.teacher.spec} (imported answers). Add the file's prompts to the logs instead"
        )
    service = TeacherService.for_task(
        recipe.teacher,
        recipe.capture.cache,
        task,  # as capture asks it
        progress="evaluate (eval.file teacher)",
    )
    try:
        answers: list[Completion] = service.answer_sync(
            [task.teacher_messages(r["messages"], recipe.teacher.few_shot) for r in rows]
        )
        spent = service.report.spent_usd
    finally:
        service.close()
    failed = [r["id"] for r, a in zip(rows, answers) if a.error]
    if failed:
        raise DistillError(
            f"evaluate: the teacher failed on {len(failed)} eval.file prompts (first: {failed[0]}); "
            "rerun to retry them (answers already bought are cached)"
        )
    return [{**r, "completion": a.text.strip()} for r, a in zip(rows, answers)], spent
