"""How good can the demo's local teacher be? Gold accuracy against its prompt: worked examples per
label in the (cached) prefix, and the wording of the instructions.

    .venv/bin/python bench/bench_teacher_prompt.py [--prompts 240] [--quick]

The embedded SmolLM2-135M as the teacher, decoding constrained to the 12 labels, exactly as the
demo's capture runs it (`Task.teacher_messages`, `generate_batch` with a `PrefixCache`). Scored on
a label-stratified sample of demo prompts *past* the demo's `capture.limit`, so the prompts the
choice is made on never reach the demo's train, validation or test splits. Every arm gets a
bootstrap 95% CI (resampling prompts): a gap inside the CIs is not a reason to change the task.
Writes bench/results/teacher_prompt.json (bench/harness.py: envelope and figures); docs/quality.md
shows it. --quick: 12 prompts (1 per label), the 'list' wording with 0 and 1
examples per label only, 200 bootstrap resamples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
SEED = 7

# One line per label: what the label is for, for a teacher that cannot guess it from the name.
DESCRIPTIONS = {
    "track_order": "where a parcel is, shipping or delivery status",
    "return_item": "wants to send an item back",
    "refund_status": "when or whether refund money arrives",
    "damaged_item": "an item arrived broken or damaged",
    "wrong_item": "received a different item than the one ordered",
    "cancel_order": "cancel an order that has not shipped",
    "change_address": "change where an order is delivered",
    "payment_failed": "a card declined or a payment error at checkout",
    "password_reset": "cannot log in, or a password reset problem",
    "cancel_subscription": "stop a recurring subscription or membership",
    "invoice_request": "wants an invoice, receipt or VAT document",
    "promo_code": "a discount code or voucher that does not work",
}

# A second hand-written worked example per label (the first set is data/task.yaml's).
SECOND_EXAMPLES = [
    ("Order 5512 was meant to come last week. Any news on where it is?", "track_order"),
    ("The jacket doesn't fit. What's the process to return it?", "return_item"),
    ("I sent the lamp back a fortnight ago and still no refund. What's happening?", "refund_status"),
    ("My new headphones arrived with a cracked headband.", "damaged_item"),
    ("The parcel had a toaster in it, but I ordered a kettle.", "wrong_item"),
    ("I changed my mind, please cancel order 7731 before it goes out.", "cancel_order"),
    ("I've moved house, can the delivery go to 18 Mill Lane?", "change_address"),
    ("My payment keeps failing at the last step of checkout.", "payment_failed"),
    ("Forgot my password and the reset email isn't arriving.", "password_reset"),
    ("Please end my coffee subscription so I'm not charged next month.", "cancel_subscription"),
    ("I need a proper invoice with my company name for order 3390.", "invoice_request"),
    ("My discount code says expired but the email said it runs till Sunday.", "promo_code"),
]


def described_instructions(labels: list[str]) -> str:
    lines = "\n".join(f"- {label}: {DESCRIPTIONS[label]}" for label in labels)
    return (
        "You triage customer support messages for an online store. Reply with exactly one label "
        f"from this list and nothing else.\n{lines}"
    )


def variant(task_data: dict, wording: str, per_label: int) -> dict:
    data = dict(task_data)
    if wording == "described":
        data["instructions"] = described_instructions(task_data["labels"])
    first = task_data["examples"]
    second = [{"prompt": p, "label": label} for p, label in SECOND_EXAMPLES]
    data["examples"] = (first + second)[: per_label * len(first)] if per_label else []
    return data


def stratified(rows: list[dict], labels: list[str], per_label: int) -> list[dict]:
    rng = random.Random(SEED)
    picked = []
    for label in labels:
        pool = [r for r in rows if r["gold"] == label]
        picked += rng.sample(pool, min(per_label, len(pool)))
    rng.shuffle(picked)
    return picked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=None, help="default 240 (quick: 12)")
    parser.add_argument("--batch", type=int, default=16)
    harness.add_arguments(parser)
    args = parser.parse_args()
    args.prompts = args.prompts or (12 if args.quick else 240)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    arms_wanted = (
        [("list", 0), ("list", 1)] if args.quick else [(w, n) for w in ("list", "described") for n in (0, 1, 2)]
    )
    resamples = 200 if args.quick else 1000

    from pipeline.artifacts import read_jsonl
    from pipeline.config import load_recipe
    from pipeline.conversation import user_turn
    from pipeline.llm.encoding import PrefixCache
    from pipeline.llm.generate import generate_batch
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.stats import mean_figure
    from pipeline.task import Task

    task_data = yaml.safe_load((ROOT / "data" / "task.yaml").read_text())
    limit = load_recipe(str(ROOT / "recipes" / "smollm2-135m-cpu.yaml")).capture.limit
    unseen = read_jsonl(ROOT / "data" / "prompts.jsonl")[limit:]
    rows = stratified(unseen, task_data["labels"], args.prompts // len(task_data["labels"]))
    tokenizer, model = load_tokenizer(MODEL), load_model(MODEL, device_plan()).eval()

    arms = []
    for wording, per_label in arms_wanted:
        task = Task(**variant(task_data, wording, per_label))
        start, cache, answers = time.perf_counter(), PrefixCache(), []
        conversations = [task.teacher_messages(user_turn(r["prompt"])) for r in rows]
        for i in range(0, len(conversations), args.batch):
            answers += generate_batch(
                model, tokenizer, conversations[i : i + args.batch], 8, task.labels, prefix_cache=cache
            )
        correct = [task.normalize_label(a.text) == r["gold"] for a, r in zip(answers, rows)]
        figure = mean_figure(correct, resamples, 0)
        arm = {
            "wording": wording,
            "examples_per_label": per_label,
            "gold_accuracy": figure.value,
            "ci95": [figure.lo, figure.hi],
            "prefix_tokens": len(tokenizer.apply_chat_template(task.teacher_messages(user_turn(""))[:-1])["input_ids"]),
            "wall_s": round(time.perf_counter() - start, 1),
        }
        arms.append(arm)
        print(json.dumps(arm), flush=True)
    best = max(arms, key=lambda a: a["gold_accuracy"])
    result = {
        "prompts": len(rows),
        "sample": f"{len(rows) // len(task_data['labels'])} per label from data/prompts.jsonl "
        f"rows {limit}+ (never captured by the demo), seed {SEED}",
        "teacher": MODEL,
        "arms": arms,
        "best": best,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": f"python bench/bench_teacher_prompt.py --prompts {args.prompts}",
    }
    harness.write("teacher_prompt", result, args)
    print(json.dumps(best))


if __name__ == "__main__":
    main()
