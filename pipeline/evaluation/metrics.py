"""Scoring: does an answer agree with the teacher's (or the gold label), and the summary rates."""

from __future__ import annotations

from pipeline.llm.completion import Completion
from pipeline.task import Task


def agrees(task: Task, answer: str, reference: str) -> bool:
    """Classification: same label after normalisation. Otherwise: equal after trimming."""
    if task.kind == "classification":
        label = task.normalize_label(answer)
        return label is not None and label == task.normalize_label(reference)
    return answer.strip() == reference.strip()


def score_example(ex: dict, base: Completion, tuned: Completion, task: Task) -> dict:
    """One test example's predictions row: both students' answers, the teacher's, gold, agreement."""
    gold = ex.get("gold") or None
    return {
        "id": ex["id"],
        "prompt": ex["prompt"],
        "teacher": ex["completion"],
        "gold": gold,
        "base": base.text,
        "tuned": tuned.text,
        "tuned_confidence": tuned.mean_logprob,
        "base_agrees": agrees(task, base.text, ex["completion"]),
        "tuned_agrees": agrees(task, tuned.text, ex["completion"]),
        "teacher_correct": agrees(task, ex["completion"], gold) if gold else None,
        "tuned_correct": agrees(task, tuned.text, gold) if gold else None,
        "tuned_stopped": tuned.stopped,
    }


def summarize(scored: list[dict]) -> dict[str, float]:
    n = len(scored)
    metrics = {
        "base_agreement": sum(s["base_agrees"] for s in scored) / n,
        "tuned_agreement": sum(s["tuned_agrees"] for s in scored) / n,
        "tuned_stop_rate": sum(s["tuned_stopped"] for s in scored) / n,
    }
    with_gold = [s for s in scored if s["gold"]]
    if with_gold:
        metrics["teacher_accuracy"] = sum(s["teacher_correct"] for s in with_gold) / len(with_gold)
        metrics["tuned_accuracy"] = sum(s["tuned_correct"] for s in with_gold) / len(with_gold)
    return metrics
