"""Generate the extraction demo: customer e-mails and order notes to an online store, each with the
JSON record a careful reader would extract from it (the gold), and a one-sentence gold summary.

Stdlib only and seeded, so re-running gives byte-identical output:

    .venv/bin/python data/generate_extraction.py [--out data/extraction_prompts.jsonl]

Each row is built the other way round from how it is used: first the record (which fields are
present, their values), then a message that states exactly those facts, in shuffled order, with
varied phrasings, greetings, sign-offs and casing. So the gold is right by construction. Some
messages are deliberately hard: a date given only as "last Tuesday" (no calendar date can be
extracted: gold null), two amounts where only one is what the customer was charged, an order id
typed in lower case. Those rows name the hard fields in `ambiguous`.

Row: {"id", "prompt", "gold": {<the 9 fields>}, "ambiguous": [<field>, ...], "summary": "<one sentence>"}
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240917
ROWS = 900
FIELDS = (
    "order_id",
    "customer_name",
    "request_type",
    "order_date",
    "amount",
    "currency",
    "items",
    "urgent",
    "contact_email",
)

REQUEST_TYPES = (
    "refund",
    "return",
    "exchange",
    "cancellation",
    "delivery_problem",
    "address_change",
    "billing_question",
)
# The sentence that carries the request; {items} is the product phrase, {when} an optional date clause.
ASKS: dict[str, list[str]] = {
    "refund": [
        "I would like a refund for the {items}{when}.",
        "Please refund me for the {items}{when}, it was not what I expected.",
        "Can I get my money back for the {items}{when}?",
        "I returned the {items}{when} and I'm still waiting for my refund.",
        "Requesting a full refund for the {items}{when}.",
    ],
    "return": [
        "I want to send back the {items}{when}.",
        "How do I return the {items}{when}? Not what I hoped for.",
        "Please send me a return label for the {items}{when}.",
        "I'd like to return the {items}{when}, still unopened.",
    ],
    "exchange": [
        "Could I swap the {items}{when} for a different size?",
        "I'd like to exchange the {items}{when} for another colour.",
        "Can you exchange the {items}{when}? Wrong size.",
        "Please replace the {items}{when} with the next size up.",
    ],
    "cancellation": [
        "Please cancel the {items}{when}.",
        "I need to cancel the {items}{when} before it ships.",
        "Cancel the order with the {items}{when}, I ordered by mistake.",
        "I changed my mind, please cancel the {items}{when}.",
    ],
    "delivery_problem": [
        "The {items}{when} never arrived.",
        "My parcel with the {items}{when} still hasn't been delivered.",
        "Tracking for the {items}{when} has not moved in a week.",
        "The courier says the {items}{when} arrived but nothing came.",
    ],
    "address_change": [
        "Please ship the {items}{when} to my new address instead.",
        "I moved last week, can you change the delivery address for the {items}{when}?",
        "The address on the {items}{when} is wrong, please update it before dispatch.",
    ],
    "billing_question": [
        "I was charged twice for the {items}{when}.",
        "Why does my statement show a payment for the {items}{when} that looks wrong?",
        "Can you explain the charge for the {items}{when}?",
        "The invoice for the {items}{when} doesn't match what I paid.",
    ],
}

PRODUCTS = [
    "yoga mat",
    "desk lamp",
    "coffee grinder",
    "rain jacket",
    "hiking boots",
    "phone case",
    "water bottle",
    "wool scarf",
    "laptop stand",
    "kettle",
    "backpack",
    "table lamp",
    "running shoes",
    "bath towels",
    "blender",
    "webcam",
    "throw pillow",
    "cast iron pan",
    "bike helmet",
    "tea set",
    "denim jacket",
    "wall clock",
    "board game",
    "plant pot",
]
FIRST = [
    "Priya",
    "Tom",
    "Ana",
    "Jordan",
    "Mei",
    "Lukas",
    "Fatima",
    "Chris",
    "Olga",
    "Daniel",
    "Aisha",
    "Sam",
    "Elena",
    "Marcus",
    "Yuki",
    "Grace",
    "Omar",
    "Hannah",
]
LAST = [
    "Shah",
    "Becker",
    "Silva",
    "Okafor",
    "Chen",
    "Novak",
    "Haddad",
    "Murphy",
    "Ivanova",
    "Reyes",
    "Khan",
    "Larsen",
    "Rossi",
    "Brooks",
    "Tanaka",
    "Walsh",
    "Diallo",
    "Meyer",
]
MONTHS = list(calendar.month_name)[1:]  # English: Python never sets LC_TIME from the environment
CURRENCIES = {
    "USD": ["${v}", "{v} USD", "US${v}"],
    "EUR": ["€{v}", "{v} EUR", "EUR {v}"],
    "GBP": ["£{v}", "{v} GBP", "GBP {v}"],
}
DOMAINS = ["gmail.com", "outlook.com", "mail.com", "proton.me"]
GREETINGS = ["Hi,", "Hello,", "Hi there,", "Dear support,", "Good morning,", "Hello team,"]
OPENERS = ["Order note:", "Re: my order.", "Quick one.", "Following up on my purchase."]
URGENT_CUES = [
    "This is urgent.",
    "Please sort this out ASAP.",
    "I need this resolved today.",
    "Urgent: please reply quickly.",
]
CALM_CLOSERS = ["Thanks in advance.", "Thank you.", "Have a nice day.", "No rush."]
RELATIVE_DATES = ["last Tuesday", "a few days ago", "at the weekend", "earlier this month"]


def record(rng: random.Random) -> tuple[dict, list[str]]:
    """The gold record and which of its fields are ambiguous by construction."""
    ambiguous = []
    gold: dict = dict.fromkeys(FIELDS)
    gold["request_type"] = rng.choice(REQUEST_TYPES)
    if rng.random() < 0.8:
        gold["order_id"] = f"ORD-{rng.randint(100000, 999999)}"
    if rng.random() < 0.7:
        gold["customer_name"] = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    date_roll = rng.random()
    if date_roll < 0.6:
        gold["order_date"] = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    elif date_roll < 0.72:
        ambiguous.append("order_date")  # "last Tuesday": no calendar date in the message
    if rng.random() < 0.6:
        gold["amount"] = round(rng.randint(5, 400) + rng.choice([0, 0, 0.5, 0.99, rng.randint(1, 99) / 100]), 2)
        gold["currency"] = rng.choice(list(CURRENCIES))
    n_items = rng.choices([0, 1, 2, 3], weights=[2, 6, 3, 1])[0]
    gold["items"] = rng.sample(PRODUCTS, n_items)
    gold["urgent"] = rng.random() < 0.3
    if rng.random() < 0.35:
        first = (gold["customer_name"] or rng.choice(FIRST)).split()[0].lower()
        gold["contact_email"] = f"{first}.{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
    return gold, ambiguous


def money(value: float, currency: str, rng: random.Random) -> str:
    text = f"{value:.2f}" if value != int(value) or rng.random() < 0.3 else str(int(value))
    return rng.choice(CURRENCIES[currency]).format(v=text)


def date_text(iso: str, rng: random.Random) -> str:
    year, month, day = (int(x) for x in iso.split("-"))
    return rng.choice(
        [
            iso,
            f"{day} {MONTHS[month - 1]} {year}",
            f"{MONTHS[month - 1]} {day}, {year}",
            f"{day:02d}/{month:02d}/{year}",
        ]
    )


def items_text(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def message(gold: dict, ambiguous: list[str], rng: random.Random) -> tuple[str, list[str]]:
    """The customer's message stating exactly the gold's facts; may add to `ambiguous`."""
    when = ""
    if gold["order_date"]:
        when = rng.choice([" I ordered on {d}", " bought on {d}", " from my order of {d}"]).format(
            d=date_text(gold["order_date"], rng)
        )
    elif "order_date" in ambiguous:
        when = f" I bought {rng.choice(RELATIVE_DATES)}"
    ask = rng.choice(ASKS[gold["request_type"]])
    if when:  # the date clause reads as its own aside inside the sentence
        when = f" ({when.strip()})" if rng.random() < 0.5 else "," + when
    if gold["items"]:
        request = ask.format(items=items_text(gold["items"]), when=when)
    else:  # no product named: the request is about the order as a whole
        request = ask.replace("The {items}", "My order").replace("the {items}", "my order").format(when=when)
    facts = [request]
    if gold["order_id"]:
        order_id = gold["order_id"]
        if rng.random() < 0.12:  # typed in lower case: the record still writes it as the store does
            order_id = order_id.lower()
            ambiguous.append("order_id")
        facts.append(
            rng.choice(["My order number is {o}.", "Order {o}.", "The order id is {o}.", "Reference: {o}."]).format(
                o=order_id
            )
        )
    if gold["amount"] is not None:
        paid = money(gold["amount"], gold["currency"], rng)
        if rng.random() < 0.15:  # a second, different amount that is not the charge
            other = money(round(gold["amount"] * rng.choice([0.5, 0.8, 1.25]), 2), gold["currency"], rng)
            facts.append(f"The price shown was {other} but I was charged {paid}.")
            ambiguous.append("amount")
        else:
            facts.append(
                rng.choice(["I paid {m}.", "It cost {m}.", "The total was {m}.", "I was charged {m}."]).format(m=paid)
            )
    if gold["contact_email"]:
        facts.append(
            rng.choice(["You can reach me at {e}.", "Please reply to {e}.", "My email is {e}."]).format(
                e=gold["contact_email"]
            )
        )
    body = facts[:1] + sorted(facts[1:], key=lambda _: rng.random())  # the details in any order
    parts = []
    if rng.random() < 0.5:
        parts.append(rng.choice(GREETINGS))
    elif rng.random() < 0.2:
        parts.append(rng.choice(OPENERS))
    parts += body
    if gold["urgent"]:
        parts.insert(len(parts) if rng.random() < 0.6 else min(1, len(parts)), rng.choice(URGENT_CUES))
    elif rng.random() < 0.4:
        parts.append(rng.choice(CALM_CLOSERS))
    if gold["customer_name"]:
        name = gold["customer_name"]
        parts.append(rng.choice(["Regards, {n}", "Thanks, {n}", "Best, {n}", "- {n}", "Cheers, {n}"]).format(n=name))
    text = " ".join(parts)
    if rng.random() < 0.08:  # typed in a hurry
        text = text.lower()
        if gold["order_id"] and "order_id" not in ambiguous:
            ambiguous.append("order_id")
        if gold["customer_name"]:
            ambiguous.append("customer_name")
    return text, ambiguous


SUMMARY_VERBS = {
    "refund": "asks for a refund",
    "return": "wants to return",
    "exchange": "wants to exchange",
    "cancellation": "wants to cancel",
    "delivery_problem": "reports a missing delivery of",
    "address_change": "asks to change the delivery address of",
    "billing_question": "questions the charge for",
}


def summary(gold: dict) -> str:
    """One sentence a support agent would write in a ticket's title."""
    who = gold["customer_name"] or "The customer"
    verb = SUMMARY_VERBS[gold["request_type"]]
    obj = f"the {items_text(gold['items'])}" if gold["items"] else "an order"
    if gold["request_type"] == "refund":
        sentence = f"{who} {verb} for {obj}"
    else:
        sentence = f"{who} {verb} {obj}"
    if gold["order_id"]:
        sentence += f" (order {gold['order_id']})"
    if gold["urgent"]:
        sentence += " and says it is urgent"
    return sentence + "."


def generate(rng: random.Random, excluded: set[str]) -> list[dict]:
    rows, seen = [], set(excluded)
    while len(rows) < ROWS:
        gold, ambiguous = record(rng)
        prompt, ambiguous = message(gold, ambiguous, rng)
        key = " ".join(prompt.lower().split())
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "id": f"x{len(rows) + 1:05d}",
                "prompt": prompt,
                "gold": gold,
                "ambiguous": sorted(set(ambiguous)),
                "summary": summary(gold),
            }
        )
    return rows


def example_prompts(task_path: Path) -> set[str]:
    """The task file's worked-example prompts (JSON-style double-quoted scalars), kept out of the rows."""
    if not task_path.is_file():
        return set()
    found = re.findall(r'^\s*-\s*prompt:\s*(".*")\s*$', task_path.read_text(encoding="utf-8"), re.M)
    return {" ".join(json.loads(q).lower().split()) for q in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "extraction_prompts.jsonl")
    args = parser.parse_args()
    excluded = example_prompts(HERE / "extraction_task.yaml") | example_prompts(HERE / "summary_task.yaml")
    rows = generate(random.Random(SEED), excluded)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} messages to {args.out}")


if __name__ == "__main__":
    main()
