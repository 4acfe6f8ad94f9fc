"""How each system answers the held-out prompts: the base student told the task, the tuned
student exactly as served, in batches, timed (the student's cost comes from that time)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def adapter_merged(model) -> Iterator[None]:
    """A PEFT student's adapter added into its fp32 base weights while it answers, taken out after
    (so the base can answer again with the adapter disabled). The same function within fp32
    rounding, as the router serves the merged export, and each adapted layer one matmul instead of
    three (base, LoRA's A and B): `bench/bench_label_evaluate.py` measures it. Left unmerged on
    bf16/fp16 or quantized weights, whose rounding would swallow part of the update."""
    import torch

    if not hasattr(model, "merge_adapter") or any(
        p.dtype != torch.float32 for p in model.get_base_model().parameters()
    ):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


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
        with adapter_merged(model):
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
