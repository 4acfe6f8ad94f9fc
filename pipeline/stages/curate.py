"""Curate: turn raw teacher answers into a clean, diverse, split dataset with a card.

    distill curate RECIPE

Reads `capture/teacher.jsonl`; writes `dataset/` (datasets.DatasetDict), `train.jsonl`,
`validation.jsonl`, `test.jsonl`, `card.md` and `lengths.png`. The steps, in order, each
counted in the card with a few of the examples it removed:

 1. normalise      NFKC + whitespace; drop failed calls, empty sides, refusals, cut-off answers
 2. length         student-tokenizer lengths per side and for the chat-formatted sequence
                   (longer than train.max_seq_len is dropped here, never truncated in training)
 3. dedupe         exact (normalised prompt), then near-duplicates (MinHash LSH), best teacher
                   metadata kept; numbered samples of one prompt are merged for step 5
 4. format         label set, the task's JSON Schema, the task's regex
 5. consistency    with n>1 samples: majority answer's share >= threshold; share = confidence
 6. pii            opt-in: e-mails, phones, Luhn-valid cards, IBANs -> [EMAIL] [PHONE] [CARD] [IBAN]
 7. decontaminate  against curate.eval_file here; test-vs-train right after the split (step 9)
 8. select         to curate.target_size: label-balanced, k-center inside each label
 9. split          stratified by label, fixed seed; then test prompts overlapping train are dropped

Same input and config give byte-identical outputs (nothing depends on time or hash order).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import Manifest, atomic_write_text, read_jsonl, write_jsonl
from pipeline.config import Recipe
from pipeline.curation.card import Step, plot_lengths, removed_counts, render_card
from pipeline.curation.dedup import NgramIndex, step_decontaminate, step_exact_dedupe, step_near_dedupe
from pipeline.curation.filters import FormatChecker, count_tokens, step_consistency, step_format, step_length
from pipeline.curation.pii import step_pii
from pipeline.curation.records import normalize_text, step_normalise
from pipeline.curation.selection import SPLITS, step_select, stratified_split
from pipeline.errors import DistillError
from pipeline.task import Task, load_task

log = logging.getLogger(__name__)

NAME = "curate"
SECTIONS = ("model", "curate", "train")  # train.max_seq_len drives the length filter
UPSTREAM = ("capture",)
FIGURE = "lengths.png"
COLUMNS = ("id", "prompt", "completion", "label", "gold", "teacher", "teacher_logprob", "confidence")


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    files = {"task": recipe.capture.task}
    if recipe.curate.eval_file is not None:
        files["eval_file"] = recipe.curate.eval_file
    return files


@dataclass
class Curated:
    """What the steps produced: the splits, the step log for the card, warnings, PII counts,
    and the normalised examples (the "before" of the label table and length histograms)."""

    splits: dict[str, list[dict]]
    steps: list[Step]
    notes: list[str]
    pii_counts: Counter | None
    normalised: list[dict]


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    task = load_task(inputs["task"])
    raw = read_jsonl(inputs["capture"] / "teacher.jsonl")
    eval_prompts = load_eval_prompts(inputs["eval_file"]) if "eval_file" in inputs else None
    result = curate_records(raw, task, recipe, _tokenizer(recipe), eval_prompts)
    _check_enough(result, len(raw), recipe.curate.min_examples)

    _save(result.splits, out)
    plot_lengths(result.normalised, [ex for s in SPLITS for ex in result.splits[s]], out / FIGURE)
    card = render_card(task_name=task.name, raw=raw, steps=result.steps,
                       labels_before=Counter(ex["label"] for ex in result.normalised), splits=result.splits,
                       pii_counts=result.pii_counts, figures=[FIGURE], notes=result.notes)
    atomic_write_text(out / "card.md", card)

    counts = {"input": len(raw), "kept": _kept(result), **{s: len(result.splits[s]) for s in SPLITS}}
    counts.update({f"removed_{k}": v for k, v in removed_counts(result.steps).items()})
    counts.update({f"pii_{k}": v for k, v in sorted((result.pii_counts or {}).items())})
    tracker.metrics(counts)
    tracker.artifact(out / "card.md")
    tracker.artifact(out / FIGURE)
    return Manifest(stage=NAME, counts=counts, notes=result.notes)


def curate_records(raw: list[dict], task: Task, recipe: Recipe, tokenizer, eval_prompts: list[str] | None) -> Curated:
    """Steps 1-9 on capture records; no file is read or written here."""
    cfg = recipe.curate
    steps: list[Step] = []
    examples = _apply(steps, "normalise", raw, step_normalise(raw, task, cfg))
    normalised = list(examples)
    count_tokens(examples, tokenizer)
    examples = _apply(steps, "length", examples, step_length(examples, cfg, recipe.train.max_seq_len))
    examples = _apply(steps, "exact dedupe", examples, step_exact_dedupe(examples))
    examples = _apply(steps, "near-dup (MinHash)", examples,
                      step_near_dedupe(examples, cfg.near_dup_threshold, cfg.minhash_perm, cfg.seed))
    examples = _apply(steps, "answer format", examples, step_format(examples, FormatChecker(task, cfg.labels_only)))
    examples = _apply(steps, "self-consistency", examples,
                      step_consistency(examples, task, cfg.labels_only, cfg.consistency_threshold))
    pii_counts = None
    if cfg.pii:
        examples, changed, pii_counts = step_pii(examples)
        steps.append(Step("pii scrub", len(examples), len(examples), changed=changed))
    if eval_prompts is not None:
        reference = NgramIndex(eval_prompts, cfg.decontam_ngram)
        examples = _apply(steps, "decontaminate (eval file)", examples, step_decontaminate(
            examples, reference, cfg.decontam_overlap, "eval_overlap", "the eval file"))
    selected, not_selected, notes = step_select(examples, cfg.target_size, cfg.embeddings)
    examples = _apply(steps, "select", examples, (selected, not_selected))
    splits = stratified_split(examples, cfg.split.validation, cfg.split.test, cfg.seed)
    steps.append(Step("split", len(examples), len(examples)))
    train_index = NgramIndex((ex["prompt"] for ex in splits["train"]), cfg.decontam_ngram)
    splits["test"] = _apply(steps, "decontaminate (test vs train)", splits["test"], step_decontaminate(
        splits["test"], train_index, cfg.decontam_overlap, "test_train_overlap", "train"))
    return Curated(splits, steps, notes, pii_counts, normalised)


def _apply(steps: list[Step], name: str, before: list, result: tuple[list[dict], list]) -> list[dict]:
    """Record one step's in/out counts and removals; return the survivors."""
    kept, removed = result
    steps.append(Step(name, len(before), len(kept), removed))
    log.info("curate: %s %d -> %d", name, len(before), len(kept))
    return kept


def _kept(result: Curated) -> int:
    return sum(len(result.splits[s]) for s in SPLITS)


def _tokenizer(recipe: Recipe):
    from pipeline.models import load_tokenizer

    return load_tokenizer(recipe.model.base, recipe.model.chat_template)


def load_eval_prompts(path: Path) -> list[str]:
    """Prompts of an external eval set: a 'prompt' field, else the last user message."""
    prompts = []
    for record in read_jsonl(path):
        text = record.get("prompt")
        if not isinstance(text, str):
            users = [m.get("content", "") for m in record.get("messages", []) if m.get("role") == "user"]
            text = users[-1] if users else ""
        if text.strip():
            prompts.append(normalize_text(text))
    if not prompts:
        raise DistillError(f"{path}: no prompts found (expected a 'prompt' field or chat 'messages')")
    return prompts


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

    features = Features({
        **{c: Value("string") for c in ("id", "prompt", "completion", "label", "gold", "teacher")},
        "teacher_logprob": Value("float64"),
        "confidence": Value("float64"),
    })
    rows = {s: [{c: ex[c] for c in COLUMNS} for ex in splits[s]] for s in SPLITS}
    DatasetDict({s: Dataset.from_list(rows[s], features=features) for s in SPLITS}).save_to_disk(str(out / "dataset"))
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", [to_chat_record(r) for r in rows[name]])


def to_chat_record(ex: dict) -> dict:
    return {
        "id": ex["id"],
        "messages": [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["completion"]}],
        "meta": {"label": ex["label"], "gold": ex["gold"], "teacher": ex["teacher"],
                 "teacher_logprob": ex["teacher_logprob"], "confidence": ex["confidence"]},
    }
