"""Step 6 (opt-in): replace personal data with typed placeholders.

Card and IBAN candidates are checksum-verified (Luhn, ISO 13616 mod 97) so that order
numbers and other long digit runs are left alone.
"""

from __future__ import annotations

import re
from collections import Counter

from pipeline.curation.records import Removal

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE = re.compile(r"(?<![\w+])(?:\+|\(\d)?[\d(][\d ().-]{6,}\d(?!\w)")
PLACEHOLDERS = {"email": "[EMAIL]", "iban": "[IBAN]", "card": "[CARD]", "phone": "[PHONE]"}


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 13:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _phone_like(candidate: str) -> bool:
    # 9-15 digits: long enough to skip dates and short ids, short enough to skip card-length runs.
    return 9 <= sum(c.isdigit() for c in candidate) <= 15


def scrub(text: str, counts: Counter) -> str:
    """Replace PII in text, adding one count per replacement to `counts` (keyed by type)."""
    rules = (
        ("email", EMAIL, None),
        ("iban", IBAN, iban_valid),
        ("card", CARD, luhn_valid),
        ("phone", PHONE, _phone_like),
    )
    for kind, pattern, valid in rules:
        text = pattern.sub(lambda m, k=kind, v=valid: _replace(m, k, v, counts), text)
    return text


def _replace(match: re.Match, kind: str, valid, counts: Counter) -> str:
    if valid is not None and not valid(match.group(0)):
        return match.group(0)
    counts[kind] += 1
    return PLACEHOLDERS[kind]


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
