"""How each system answers the held-out prompts: the base student told the task, the tuned
student exactly as served, in batches, timed (the student's cost comes from that time)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from pipeline.config import Recipe
from pipeline.conversation import Shape, conversation_of, student_messages
from pipeline.llm.answer import Serving, answer_as_served, served_schema
from pipeline.llm.completion import Completion
from pipeline.llm.encoding import PrefixCache
from pipeline.llm.generate import generate_batch
from pipeline.task import Task


@dataclass
class Answers:
    """One system's answers to a split, and the wall time they took (the student's cost)."""

    completions: list[Completion]
    wall_s: float


def base_conversation(task: Task, conversation: list[dict], form: str, shape: Shape) -> list[dict]:
    """The honest baseline: the base student told the task (zero/few-shot, as the teacher is told
    it), or bare, shown what the tuned one is shown."""
    if form == "bare":
        return student_messages(conversation, shape)
    return task.teacher_messages(conversation, few_shot=form == "few_shot")


def answer_all(
    model,
    tokenizer,
    rows: list[dict],
    recipe: Recipe,
    task: Task,
    desc: str,
    shape: Shape,
    base_prompt: str | None = None,
) -> Answers:
    """Answers in batches, timed. The tuned student answers as served (`answer_as_served` on what
    it sees of each conversation, in `shape`, decoded as `router.decode` says, every label scored
    on a classification task, which the label signals read); the base student, told the task,
    greedy and constrained as the student is (to the labels, or to an extraction task's schema)."""
    labels = task.labels if task.kind == "classification" else None
    start = time.perf_counter()

    def progress(starts: range) -> tqdm:
        return tqdm(starts, desc=f"evaluate ({desc})", unit="batch")

    if base_prompt is None:
        convs = [student_messages(conversation_of(r), shape) for r in rows]
        completions = answer_as_served(
            model, tokenizer, convs, Serving.of(recipe, task), source=desc, progress=progress
        )
        return Answers(completions, time.perf_counter() - start)
    prefix = PrefixCache()  # the instructions, run once for every batch
    completions, size = [], recipe.eval.batch_size
    for i in progress(range(0, len(rows), size)):
        convs = [base_conversation(task, conversation_of(r), base_prompt, shape) for r in rows[i : i + size]]
        completions += generate_batch(
            model,
            tokenizer,
            convs,
            recipe.eval.max_new_tokens,
            labels=labels,
            source=desc,
            prefix_cache=prefix,
            schema=served_schema(recipe, task),
        )
    return Answers(completions, time.perf_counter() - start)
