"""The user's own held-out file (`eval.file`): prompts, optional gold, and the teacher's answers.

    distill evaluate RECIPE eval.file=data/my_eval.jsonl

JSONL (a prompt field, or chat `messages` whose last user turn is the prompt) or CSV. Curate
keeps these prompts out of training (it reads the same `eval.file`). The teacher answers them
through the teacher service, so its answers are cached, costed and budgeted like capture's.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.artifacts import read_jsonl
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion
from pipeline.task import Task, gold_text


def _prompt_of(record: dict, field: str) -> str:
    text = record.get(field)
    if isinstance(text, str):
        return text.strip()
    users = [m.get("content", "") for m in record.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1].strip() if users and isinstance(users[-1], str) else ""


def read_heldout(path: Path, prompt_field: str, gold_field: str | None) -> list[dict]:
    """Rows {id, prompt, gold}; a file without a single prompt is an error naming the field."""
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
        prompt = _prompt_of(record, prompt_field)
        if prompt:
            gold = record.get(gold_field) if gold_field else None
            rows.append({"id": str(record.get("id") or f"heldout-{i}"), "prompt": prompt,
                         "gold": gold_text(gold)})
    if not rows:
        raise DistillError(f"{path}: no prompts (expected a '{prompt_field}' field/column or chat 'messages')")
    return rows


def teacher_answers(recipe, task: Task, rows: list[dict]) -> tuple[list[dict], float]:
    """Each row with the teacher's answer as `completion`, and what the calls cost (cached: free)."""
    from pipeline.teachers.service import TeacherService

    if recipe.teacher.spec.startswith("logs:"):
        raise DistillError("eval.file needs a teacher that can answer new prompts; teacher.spec is "
                           f"{recipe.teacher.spec} (imported answers). Add the file's prompts to the logs instead")
    service = TeacherService.for_task(recipe.teacher, recipe.capture.cache, task,  # as capture asks it
                                      progress="evaluate (eval.file teacher)")
    try:
        answers: list[Completion] = service.answer_sync(
            [task.teacher_messages(r["prompt"], recipe.teacher.few_shot) for r in rows])
        spent = service.report.spent_usd
    finally:
        service.close()
    failed = [r["id"] for r, a in zip(rows, answers) if a.error]
    if failed:
        raise DistillError(f"evaluate: the teacher failed on {len(failed)} eval.file prompts (first: {failed[0]}); "
                           "rerun to retry them (answers already bought are cached)")
    return [{**r, "completion": a.text.strip()} for r, a in zip(rows, answers)], spent

