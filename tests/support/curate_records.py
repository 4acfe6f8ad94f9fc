"""Shared by the curate tests: a small handmade capture (its task file and records) with planted
leaks and one record for each normalise-step failure."""

import random

LABELS = ["track_order", "return_item", "refund_status"]
TASK_YAML = """\
name: mini
kind: classification
instructions: Reply with one label.
labels: [track_order, return_item, refund_status]
"""
LEAK = "my parcel was due on tuesday and the tracking page has not moved since then"


def record(i: int, prompt: str, answer: str, **meta) -> dict:
    return {
        "id": f"r{i:03d}",
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "meta": {
            "teacher": "openai:gpt-test",
            "logprobs": -0.1 * (i % 7),
            "finish_reason": "stop",
            "error": None,
            "cost_usd": 0.002,
            **meta,
        },
    }


def capture_records() -> list[dict]:
    """60 distinct prompts (random words, so no two are near-duplicates), a planted family of
    test/train leaks, and one record for each normalise-step failure."""
    rng = random.Random(7)
    vocab = [f"{a}{b}" for a in ("bla", "cro", "dun", "fel", "gri", "hop", "jun", "kel") for b in "aeiouyz"]
    records = []
    for i in range(60):
        label = LABELS[i % 3]
        records.append(
            record(i, " ".join(rng.sample(vocab, 9)) + f" {label.split('_')[0]}?", label.replace("_", " ").title())
        )
    for k, extra in enumerate(
        [
            "Hi!",
            "Hello.",
            "Thanks.",
            "Regards, Sam",
            "Good morning.",
            "Cheers, Ana",
            "ASAP!",
            "thx",
            "Hey.",
            "Yo!",
            "Help!",
            "Cheers, Tom",
            "Quick one.",
            "Urgent!",
            "Sorry.",
            "Best, Mei",
        ]
    ):
        records.append(record(100 + k, f"{extra} {LEAK}", "track_order"))
    records.append(record(200, "please help", "I'm sorry, but I can't help with that."))
    records.append(record(201, "where is it", "", error="timeout"))
    records.append(record(202, "where is it now", "The customer is asking", finish_reason="length"))
    records.append(record(203, "bla cro dun", "shipping"))
    return records
