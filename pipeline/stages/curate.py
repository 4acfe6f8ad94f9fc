"""Curate: turn raw teacher answers into a clean, diverse, split dataset with a card.

    distill curate RECIPE

Reads `capture/teacher.jsonl`; writes `dataset/` (datasets.DatasetDict), `train.jsonl`,
`validation.jsonl`, `test.jsonl`, `card.md`, `lengths.png` and `student_input.json`. Each example
keeps the conversation as the app sent it (`messages`) and the teacher's answer; what the student
sees of it is `model.student_input`, resolved here over the records (`auto`: a system prompt shared
by every record is learned away, one that varies is kept), named in the card and written to
`student_input.json`, which finetune, evaluate and export read. Steps 0-8 are the registry
`pipeline.curation.steps.STEPS`, walked in order (a step that is off is skipped); step 9 acts
on the splits. Each is counted in the card with a few of the examples it removed:

 0. pii            opt-in, first: e-mails, phones, Luhn-valid cards, IBANs -> [EMAIL] [PHONE]
                   [CARD] [IBAN] in every message, so no later step shows or keeps raw PII
 1. normalise      NFKC + whitespace; drop failed calls, empty sides, refusals, cut-off answers
 2. length         student-tokenizer lengths of what the student reads (every turn) and of the
                   answer, and of the chat-formatted sequence
                   (longer than train.max_seq_len is dropped here, never truncated in training)
 3. dedupe         exact (normalised conversation), then near-duplicates (MinHash LSH over the
                   user and assistant turns, same system prompt), best teacher
                   metadata kept; numbered samples of one prompt are merged for step 5
 4. format         label set, the task's JSON Schema, the task's regex
 5. consistency    with n>1 samples: majority answer's share >= threshold; share = confidence
 7. decontaminate  against eval.file (the held-out file evaluate scores) and curate.frozen_test here;
                   test-vs-train right after the split (step 9)
 8. select         to curate.target_size: label-balanced, k-center inside each label
 9. split          stratified by label, fixed seed; then test prompts overlapping train are dropped.
                   With curate.frozen_test (what `distill retrain` sets) that file is the test split,
                   verbatim, and the examples make train and validation only.

Same input and config give byte-identical outputs (nothing depends on time or hash order).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.artifacts import (
    CAPTURE_RECORDS,
    CURATED_DATASET,
    SPLITS,
    Manifest,
    atomic_write_text,
    iter_jsonl,
    read_jsonl,
    write_jsonl,
)
from pipeline.config import Recipe
from pipeline.conversation import StudentInput, StudentView, resolve_student_input, split_answer, write_student_view
from pipeline.curation.card import StepRecord, plot_lengths, removed_counts, render_card
from pipeline.curation.records import example_weight, normalize_text, read_conversation, with_student_view
from pipeline.curation.steps import (
    NORMALISE,
    SPLIT,
    STEPS,
    TEST_DECONTAMINATION,
    CurateContext,
    CurateStep,
    StepResult,
    decontaminate_test,
    split,
)
from pipeline.errors import DistillError
from pipeline.task import load_task

log = logging.getLogger(__name__)

NAME = "curate"
# max_seq_len: the length filter; the held-out file's prompt field: what is kept out of training
READS: tuple[str, ...] = (
    "model.base",
    "model.chat_template",
    "model.student_input",
    "curate",
    "train.max_seq_len",
    "eval.file_prompt_field",
)
UPSTREAM: tuple[str, ...] = ("capture",)
RESUMABLE = False
ALL_RANKS = False
SYSTEM_METRICS = False
FIGURE = "lengths.png"
CARD = "card.md"
COLUMNS = (
    "id",
    "messages",
    "completion",
    "label",
    "gold",
    "teacher",
    "teacher_logprob",
    "confidence",
    "teacher_label_probs",
    "weight",
)


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    from pipeline.llm.loading import TOKENIZER_PATTERNS, model_files

    files = {"task": recipe.capture.task}
    # The length filter counts the student's tokens: a local tokenizer's content, not its path.
    files |= {f"student_tokenizer/{n}": p for n, p in model_files(recipe.model.base, TOKENIZER_PATTERNS).items()}
    if recipe.model.chat_template is not None:
        files["chat_template"] = recipe.model.chat_template
    if recipe.eval.file is not None:  # one setting: evaluate scores the file, curate keeps it out of training
        files["eval_file"] = recipe.eval.file
    if recipe.curate.frozen_test is not None:
        files["frozen_test"] = recipe.curate.frozen_test
    if recipe.curate.frozen_validation is not None:
        files["frozen_validation"] = recipe.curate.frozen_validation
    return files


@dataclass
class Curated:
    """What the steps produced: the splits, the step log for the card, warnings, PII counts,
    and the normalised examples (the "before" of the label table and length histograms)."""

    splits: dict[str, list[dict]]
    steps: list[StepRecord]
    notes: list[str]
    pii_counts: Counter | None
    normalised: list[dict]
    view: StudentView


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from pipeline.llm.loading import check_recipe_models

    check_recipe_models(recipe)
    task = load_task(inputs["task"])
    raw = read_jsonl(inputs["capture"] / CAPTURE_RECORDS)
    held_out = (
        load_eval_conversations(inputs["eval_file"], recipe.eval.file_prompt_field) if "eval_file" in inputs else None
    )
    frozen = {s: load_frozen_split(inputs[f"frozen_{s}"], s) for s in ("test", "validation") if f"frozen_{s}" in inputs}
    ctx = CurateContext.from_recipe(
        recipe, task, _tokenizer(recipe), held_out, frozen.get("test"), frozen.get("validation")
    )
    result = curate_records(raw, ctx)
    _check_enough(result, len(raw), recipe.curate.min_examples)

    _save(result.splits, out)
    plot_lengths(result.normalised, [ex for s in SPLITS for ex in result.splits[s]], out / FIGURE)
    card = render_card(
        task_name=task.name,
        raw=raw,
        steps=result.steps,
        labels_before=Counter(ex["label"] for ex in result.normalised),
        splits=result.splits,
        pii_counts=result.pii_counts,
        figures=[FIGURE],
        notes=result.notes,
        view=result.view,
    )
    atomic_write_text(out / CARD, card)
    write_student_view(out, result.view)
    log.info("curate: the student reads %s (%s)", result.view.shape, result.view.reason)

    counts = {"input": len(raw), "kept": _kept(result), **{s: len(result.splits[s]) for s in SPLITS}}
    counts.update({f"removed_{k}": v for k, v in removed_counts(result.steps).items()})
    counts.update({f"pii_{k}": v for k, v in sorted((result.pii_counts or {}).items())})
    tracker.metrics(counts)
    tracker.artifact(out / CARD)
    tracker.artifact(out / FIGURE)
    return Manifest(stage=NAME, counts=counts, notes=result.notes)


def curate_records(raw: list[dict], ctx: CurateContext, registry: tuple[CurateStep, ...] = STEPS) -> Curated:
    """The registry's steps on capture records, then the split and the test-vs-train
    decontamination; no file is read or written here."""
    if ctx.view is None:
        ctx = replace(ctx, view=resolve_view(raw, ctx.student_input))
    for ex in ctx.frozen:
        with_student_view(ex, ctx.shape)
    trail: list[StepRecord] = []
    notes: list[str] = []
    pii_counts, normalised = None, None
    examples = raw
    for step in registry:
        if not step.enabled(ctx):
            continue
        result = step.apply(examples, ctx)
        _record(trail, step.name, len(examples), result)
        notes += result.notes
        pii_counts = result.pii_counts if result.pii_counts is not None else pii_counts
        if step.name == NORMALISE:  # it made examples of the records: the card's "before"
            normalised = list(result.kept)
        examples = result.kept
    splits = split(examples, ctx)
    trail.append(StepRecord(SPLIT, len(examples), len(examples)))
    test = decontaminate_test(splits, ctx)
    _record(trail, TEST_DECONTAMINATION, len(splits["test"]), test)
    splits["test"] = test.kept
    assert ctx.view is not None  # resolved at the top
    return Curated(splits, trail, notes, pii_counts, normalised or [], ctx.view)


def resolve_view(raw: list[dict], requested: StudentInput) -> StudentView:
    """`model.student_input` over the records' conversations, their text normalised as the steps will."""
    return resolve_student_input(requested, [read_conversation(r)[0] for r in raw])


def _record(trail: list[StepRecord], name: str, n_in: int, result: StepResult) -> None:
    """Log one step's in/out counts, removals and changes for the card."""
    trail.append(StepRecord(name, n_in, len(result.kept), result.removed, result.changed))
    log.info("curate: %s %d -> %d", name, n_in, len(result.kept))


def _kept(result: Curated) -> int:
    return sum(len(result.splits[s]) for s in SPLITS)


def _tokenizer(recipe: Recipe):
    from pipeline.llm.loading import load_tokenizer

    return load_tokenizer(recipe.model.base, recipe.model.chat_template)


def load_eval_conversations(path: Path, prompt_field: str) -> list[list[dict]]:
    """The held-out file's conversations (`eval.file`) read exactly as evaluate reads them, their
    text normalised as the steps normalise the records'."""
    from pipeline.evaluation.heldout import read_heldout

    return [
        [{"role": m["role"], "content": normalize_text(m["content"])} for m in row["messages"]]
        for row in read_heldout(path, prompt_field, None)
    ]


def load_frozen_split(path: Path, split: str) -> list[dict]:
    """A test.jsonl or validation.jsonl this stage wrote (chat records) back as examples:
    `to_chat_record` inverted."""
    examples = []
    for lineno, record in iter_jsonl(path):
        try:
            split_answer(record["messages"])
            messages, answer = read_conversation(record)
            meta = record["meta"]
            examples.append(
                {
                    "id": record["id"],
                    "messages": messages,
                    "completion": answer,
                    **{c: meta[c] for c in COLUMNS[3:-1]},
                    "teacher_label_probs": meta.get("teacher_label_probs", ""),
                    "weight": example_weight(meta),
                }
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DistillError(
                f"{path}:{lineno}: not a curated {split} record ({err!r}); curate.frozen_{split} "
                f"takes the {split}.jsonl of an earlier curate"
            ) from None
    if not examples:
        raise DistillError(f"{path}: the frozen {split} split is empty")
    return examples


def _check_enough(result: Curated, n_raw: int, minimum: int) -> None:
    kept = _kept(result)
    if kept >= minimum:
        return
    trail = ", ".join(f"{s.name} {s.n_in}->{s.n_out}" for s in result.steps)
    removed = ", ".join(f"{k}={v}" for k, v in removed_counts(result.steps).items()) or "nothing"
    raise DistillError(
        f"curate: only {kept} of {n_raw} teacher records survived (need curate.min_examples={minimum}); "
        f"steps: {trail}; removed: {removed}"
    )


def _save(splits: dict[str, list[dict]], out: Path) -> None:
    """DatasetDict with fixed column types (an all-null logprob column stays float64) + JSONL."""
    from datasets import Dataset, DatasetDict, Features, Value

    features = Features(
        {
            **{c: Value("string") for c in ("id", "completion", "label", "gold", "teacher", "teacher_label_probs")},
            "messages": [{"role": Value("string"), "content": Value("string")}],
            "teacher_logprob": Value("float64"),
            "confidence": Value("float64"),
            "weight": Value("int64"),
        }
    )
    for ex in (ex for s in SPLITS for ex in splits[s]):  # a frozen test split's rows already carry it
        ex.setdefault(
            "teacher_label_probs", json.dumps(ex["label_probs"], sort_keys=True) if ex.get("label_probs") else ""
        )
    rows = {s: [{c: ex[c] for c in COLUMNS} for ex in splits[s]] for s in SPLITS}
    dataset = DatasetDict({s: Dataset.from_list(rows[s], features=features) for s in SPLITS})
    dataset.save_to_disk(str(out / CURATED_DATASET))
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", [to_chat_record(r) for r in rows[name]])


def to_chat_record(ex: dict) -> dict:
    """A curated example as a capture record: the conversation as sent, the answer it trains on."""
    return {
        "id": ex["id"],
        "messages": [*ex["messages"], {"role": "assistant", "content": ex["completion"]}],
        "meta": {
            "label": ex["label"],
            "gold": ex["gold"],
            "teacher": ex["teacher"],
            "teacher_logprob": ex["teacher_logprob"],
            "confidence": ex["confidence"],
            "teacher_label_probs": ex["teacher_label_probs"],
            **({"weight": ex["weight"]} if ex["weight"] != 1 else {}),
        },
    }
