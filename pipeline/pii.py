"""Find personal data and secrets in text and replace them with typed placeholders.

Used by curate (`curate.pii`, pipeline/curation/pii.py) and by the router's escalation and proxy
logs (`serve.scrub_pii`), so neither a dataset nor a log on disk holds the raw text.

Card and IBAN candidates are checksum-verified (Luhn, ISO 13616 mod 97 plus the country's
format, both by python-stdnum) so that order numbers and other long digit runs are left
alone. Phones stay a pattern plus a digit count: `phonenumbers` needs a region to guess and
rejects numbers it cannot place (fictional 555 numbers, unknown regions), which for a
scrubber means more leaks, not fewer. API keys and tokens pasted into a message are caught by
their providers' published prefixes (OpenAI `sk-`/`sk-proj-`, Anthropic `sk-ant-`, AWS
`AKIA`, GitHub `ghp_`/`github_pat_`, Slack `xox?-`, Google `AIza`) followed by a long key body.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import partial

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE = re.compile(r"(?<![\w+])(?:\+|\(\d)?[\d(][\d ().-]{6,}\d(?!\w)")
SECRET = re.compile(
    r"(?<![\w-])(?:sk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}"
    r"|ghp_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35})"
)
PLACEHOLDERS = {"email": "[EMAIL]", "iban": "[IBAN]", "card": "[CARD]", "phone": "[PHONE]", "secret": "[SECRET]"}


def luhn_valid(number: str) -> bool:
    """A card number: 13-19 digits passing the Luhn check (python-stdnum's)."""
    from stdnum import luhn

    digits = "".join(c for c in number if c.isdigit())
    return 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def iban_valid(candidate: str) -> bool:
    """python-stdnum checks the mod-97 checksum and the country's own length and format, so
    fewer long order codes pass for IBANs than with the checksum alone."""
    from stdnum import iban

    return iban.is_valid(candidate)


def _phone_like(candidate: str) -> bool:
    # 9-15 digits: long enough to skip dates and short ids, short enough to skip card-length runs.
    return 9 <= sum(c.isdigit() for c in candidate) <= 15


def scrub(text: str, counts: Counter) -> str:
    """Replace PII in text, adding one count per replacement to `counts` (keyed by type)."""
    rules = (
        ("secret", SECRET, None),  # first: a key's digits must not be read as a phone number
        ("email", EMAIL, None),
        ("iban", IBAN, iban_valid),
        ("card", CARD, luhn_valid),
        ("phone", PHONE, _phone_like),
    )
    for kind, pattern, valid in rules:
        text = pattern.sub(partial(_replace, kind=kind, valid=valid, counts=counts), text)
    return text


def _replace(match: re.Match, kind: str, valid, counts: Counter) -> str:
    if valid is not None and not valid(match.group(0)):
        return match.group(0)
    counts[kind] += 1
    return PLACEHOLDERS[kind]
