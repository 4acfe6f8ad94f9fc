"""Opt-in (`curate.pii`): replace personal data with typed placeholders, first of all steps.

It runs on the capture records before any other step, so nothing a later step shows (the
card's removed examples) or stores (the splits, the dataset, MLflow) ever held the raw text.
What counts as personal data, and how it is found, is pipeline/pii.py's.
"""

from __future__ import annotations

from collections import Counter

from pipeline.curation.records import Removal
from pipeline.pii import scrub


def scrub_records(records: list[dict]) -> tuple[list[dict], list[Removal], Counter]:
    """Scrub every message of capture records (copies; the input is left alone). Returns the
    records, the changed ones (reason 'pii_scrubbed', scrubbed text only) and counts per type."""
    counts: Counter = Counter()
    scrubbed, changed = [], []
    for record in records:
        before = sum(counts.values())
        messages = [{**m, "content": scrub(str(m.get("content") or ""), counts)} for m in record.get("messages", [])]
        scrubbed.append({**record, "messages": messages})
        if sum(counts.values()) > before:
            changed.append(
                Removal(
                    "pii_scrubbed", str(record.get("id", "")), _last(messages, "user"), _last(messages, "assistant")
                )
            )
    return scrubbed, changed, counts


def _last(messages: list[dict], role: str) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == role), "")


def step_pii(examples: list[dict]) -> tuple[list[dict], list[Removal], Counter]:
    """Scrub prompts and answers in place (runs after step 5 chose each example's answer);
    nothing is dropped. Returns the examples, the changed ones (reason 'pii_scrubbed', showing
    only the scrubbed text, so the card never repeats the PII) and counts per type."""
    counts: Counter = Counter()
    changed = []
    for ex in examples:
        before = sum(counts.values())
        ex["prompt"] = scrub(ex["prompt"], counts)
        ex["completion"] = scrub(ex["completion"], counts)
        if sum(counts.values()) > before:
            changed.append(Removal("pii_scrubbed", ex["id"], ex["prompt"], ex["completion"]))
    return examples, changed, counts
