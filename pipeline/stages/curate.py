"""Curate: turn raw teacher answers into a clean, split dataset with a card.

    distill curate RECIPE

Reads `capture/teacher.jsonl`; writes `dataset/` (datasets.DatasetDict), `train.jsonl`,
`validation.jsonl`, `test.jsonl` and `card.md`, counting what each filter removed.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

from pipeline.artifacts import Manifest, atomic_write_text, read_jsonl, write_jsonl
from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.task import Task, load_task

NAME = "curate"
SECTIONS = ("model", "curate", "train")  # train.max_seq_len drives the length filter
UPSTREAM = ("capture",)
SPLITS = ("train", "validation", "test")


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    return {"task": recipe.capture.task}


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    task = load_task(inputs["task"])
    raw = read_jsonl(inputs["capture"] / "teacher.jsonl")
    removed: dict[str, list[dict]] = defaultdict(list)
    examples = [e for r in raw if (e := _clean(r, task, recipe.curate.labels_only, removed))]
    examples = _dedupe(examples, removed)
    examples = _length_filter(examples, recipe, removed)
    if len(examples) < recipe.curate.min_examples:
        raise DistillError(
            f"curate: only {len(examples)} of {len(raw)} examples survived "
            f"(need curate.min_examples={recipe.curate.min_examples}); removed: {_removed_counts(removed)}"
        )
    splits = stratified_split(examples, recipe.curate.split.validation, recipe.curate.split.test, recipe.curate.seed)
    _save(splits, out)
    card = _card(task, raw, splits, removed)
    atomic_write_text(out / "card.md", card)
    counts = {"input": len(raw), "kept": len(examples), **{s: len(splits[s]) for s in SPLITS}}
    counts.update({f"removed_{k}": len(v) for k, v in removed.items()})
    tracker.metrics(counts)
    tracker.artifact(out / "card.md")
    return Manifest(stage=NAME, counts=counts)


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def _clean(record: dict, task: Task, labels_only: bool, removed: dict) -> dict | None:
    meta = record.get("meta", {})
    prompt = normalize_text(record["messages"][0]["content"])
    answer = normalize_text(record["messages"][-1]["content"])
    if meta.get("error"):
        removed["failed_call"].append(record)
        return None
    if not prompt or not answer:
        removed["empty"].append(record)
        return None
    label = task.normalize_label(answer) if task.kind == "classification" else None
    if labels_only and task.kind == "classification":
        if label is None:
            removed["off_label"].append(record)
            return None
        answer = label
    return {
        "id": record["id"],
        "prompt": prompt,
        "completion": answer,
        "label": label or "",
        "gold": meta.get("gold") or "",
        "teacher": meta.get("teacher", ""),
        "teacher_logprob": meta.get("logprobs"),
    }


def _dedupe(examples: list[dict], removed: dict) -> list[dict]:
    seen: set[str] = set()
    kept = []
    for ex in examples:
        key = ex["prompt"].lower()
        if key in seen:
            removed["duplicate"].append(ex)
            continue
        seen.add(key)
        kept.append(ex)
    return kept


def _length_filter(examples: list[dict], recipe: Recipe, removed: dict) -> list[dict]:
    """Drop (never truncate) examples whose chat-formatted length exceeds train.max_seq_len."""
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.base, recipe.model.chat_template)
    kept = []
    for ex in examples:
        conv = [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["completion"]}]
        if len(tokenizer.apply_chat_template(conv, tokenize=True)) > recipe.train.max_seq_len:
            removed["too_long"].append(ex)
        else:
            kept.append(ex)
    return kept


def stratified_split(examples: list[dict], val: float, test: float, seed: int) -> dict[str, list[dict]]:
    """Split each label group by the same fractions, so every common label is in every split."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for ex in sorted(examples, key=lambda e: e["id"]):
        groups[ex["label"]].append(ex)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for label in sorted(groups):
        group = groups[label]
        rng.shuffle(group)
        n_test = round(len(group) * test) if len(group) >= 3 else 0
        n_val = round(len(group) * val) if len(group) >= 3 else 0
        splits["test"] += group[:n_test]
        splits["validation"] += group[n_test : n_test + n_val]
        splits["train"] += group[n_test + n_val :]
    for name in SPLITS:
        splits[name].sort(key=lambda e: e["id"])
    return splits


def _save(splits: dict[str, list[dict]], out: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({s: Dataset.from_list(rows) for s, rows in splits.items()}).save_to_disk(str(out / "dataset"))
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", [to_chat_record(r) for r in rows])


def to_chat_record(ex: dict) -> dict:
    return {
        "id": ex["id"],
        "messages": [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["completion"]}],
        "meta": {"label": ex["label"], "gold": ex["gold"], "teacher": ex["teacher"]},
    }


def _removed_counts(removed: dict) -> str:
    return ", ".join(f"{k}={len(v)}" for k, v in sorted(removed.items())) or "nothing"


def _card(task: Task, raw: list[dict], splits: dict[str, list[dict]], removed: dict) -> str:
    kept = sum(len(v) for v in splits.values())
    lines = [
        f"# Dataset card: {task.name}",
        "",
        f"{len(raw)} teacher records in, {kept} kept.",
        "",
        "| filter | removed |",
        "|---|---|",
        *[f"| {k} | {len(v)} |" for k, v in sorted(removed.items())],
        "",
        "| split | examples |",
        "|---|---|",
        *[f"| {s} | {len(splits[s])} |" for s in SPLITS],
        "",
        "## Label distribution (kept)",
        "",
        "| label | train | validation | test |",
        "|---|---|---|---|",
    ]
    per_split = {s: Counter(e["label"] for e in splits[s]) for s in SPLITS}
    for label in sorted(set().union(*per_split.values())):
        lines.append(f"| {label or '(none)'} | " + " | ".join(str(per_split[s][label]) for s in SPLITS) + " |")
    lines += ["", "## Examples removed (first 3 per filter)", ""]
    for reason, items in sorted(removed.items()):
        for item in items[:3]:
            prompt = item.get("prompt") or item["messages"][0]["content"]
            answer = item.get("completion") or item["messages"][-1]["content"]
            lines.append(f"- **{reason}**: `{prompt[:80]}` → `{answer[:40]}`")
    return "\n".join(lines) + "\n"
