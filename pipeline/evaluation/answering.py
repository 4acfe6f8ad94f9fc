"""How each system answers the held-out prompts: the base student told the task, the tuned
student exactly as served, in batches, timed (the student's cost comes from that time)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from pipeline.config import Recipe
from pipeline.llm.completion import Completion
from pipeline.task import Task


@dataclass
class Answers:
    """One system's answers to a split, and the wall time they took (the student's cost)."""

    completions: list[Completion]
    wall_s: float


def base_conversation(task: Task, prompt: str, form: str) -> list[dict]:
    """The honest baseline: the base student told the task (zero/few-shot), or bare as the tuned one."""
    if form == "bare":
        return Task.student_messages(prompt)
    return task.teacher_messages(prompt, few_shot=form == "few_shot")


def answer_all(model, tokenizer, rows: list[dict], recipe: Recipe, task: Task, desc: str,
               base_prompt: str | None = None) -> Answers:
    """Greedy answers in batches. The tuned student answers as served (user message only, decoded
    as `router.decode` says) and, on a classification task, with every label scored, which the
    label signals read."""
    from pipeline.llm.generate import PrefixCache, generate_batch

    labels = task.labels if task.kind == "classification" else None
    prefix = PrefixCache() if base_prompt is not None else None  # the instructions, run once for every batch
    completions, size, start = [], recipe.eval.batch_size, time.perf_counter()
    for i in tqdm(range(0, len(rows), size), desc=f"evaluate ({desc})", unit="batch"):
        batch = rows[i : i + size]
        if base_prompt is None:
            convs = [Task.student_messages(r["prompt"]) for r in batch]
            completions += generate_batch(model, tokenizer, convs, recipe.eval.max_new_tokens, source=desc,
                                          score_labels=labels, decode=recipe.router.decode)
        else:
            convs = [base_conversation(task, r["prompt"], base_prompt) for r in batch]
            completions += generate_batch(model, tokenizer, convs, recipe.eval.max_new_tokens, labels=labels,
                                          source=desc, prefix_cache=prefix)
    return Answers(completions, time.perf_counter() - start)


