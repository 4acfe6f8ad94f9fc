"""Answering "as served": the one way a transformers student answers, wherever it answers.

    .venv/bin/pytest -q tests/loop/test_retrain.py -k as_served

Evaluate (test and validation), the sweep's validation score, the loop's champion-vs-candidate
slice, export's parity run and the router's student backend all call `answer_as_served` with a
`Serving`, so the figures they report are those of the answers the router gives: the same
decoding (greedy generation or the label posterior), the same labels scored, the same token limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pipeline.config import Recipe
from pipeline.llm.completion import Completion
from pipeline.llm.generate import generate_batch
from pipeline.task import Task


@dataclass(frozen=True)
class Serving:
    """How the student answers. `labels`: a classification task's labels, each scored by teacher
    forcing (the label signals read them; `decode="label_posterior"` answers with the likeliest).
    `schema`: an extraction task's output_schema the answer is decoded under (structured decoding)."""

    decode: str = "generate"
    labels: tuple[str, ...] | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    schema: dict | None = None

    @classmethod
    def of(cls, recipe: Recipe, task: Task) -> Serving:
        """As the recipe serves this task: `router.decode`, `eval.max_new_tokens`, `eval.batch_size`,
        the labels of a classification task, the schema of an extraction one (`router.structured`)."""
        labels = tuple(task.labels) if task.kind == "classification" else None
        return cls(
            recipe.router.decode,
            labels,
            recipe.eval.max_new_tokens,
            recipe.eval.batch_size,
            served_schema(recipe, task),
        )

    def __post_init__(self) -> None:
        if self.decode not in ("generate", "label_posterior"):
            raise ValueError(f"decode must be generate or label_posterior, not {self.decode!r}")
        if self.decode == "label_posterior" and not self.labels:
            raise ValueError("decode=label_posterior needs the labels to answer from")


def served_schema(recipe: Recipe, task: Task) -> dict | None:
    """The JSON Schema the student decodes under: an extraction task's, unless router.structured is off."""
    return task.output_schema if task.kind == "extraction" and recipe.router.structured else None


def answer_as_served(
    model,
    tokenizer,
    conversations: list[list[dict]],
    serving: Serving,
    *,
    source: str = "student",
    progress: Callable[[range], Iterable[int]] | None = None,
) -> list[Completion]:
    """The student's answers to `conversations` (already in the shape the student is served), in
    batches of `serving.batch_size`. `progress` wraps the batch range (tqdm) where a person waits."""
    starts = range(0, len(conversations), serving.batch_size)
    labels = list(serving.labels) if serving.labels else None
    completions: list[Completion] = []
    for i in progress(starts) if progress else starts:
        completions += generate_batch(
            model,
            tokenizer,
            conversations[i : i + serving.batch_size],
            serving.max_new_tokens,
            source=source,
            score_labels=labels,
            decode=serving.decode,
            schema=serving.schema,
        )
    return completions
