"""Generate the conversational demo: support chats as an online store's app sends them.

Stdlib only and seeded, so re-running gives byte-identical output:

    .venv/bin/python data/generate_chats.py [--out data/chats.jsonl] [--n 300]

Each chat is what the app sends its model: a system prompt with the store's instructions and this
customer's details (name, membership, last order and its status: per-request context), one or two
earlier exchanges, and the customer's latest message, which often only makes sense with that
context ("Where is it?", "Can I still cancel?"). A teacher answers it at capture. `reference` is a
reply written from the same facts, for reading along and for `distill init` (a chat log in OpenAI's
format is the chats with it as the last assistant turn); training never reads it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20250117
N_CHATS = 300

INSTRUCTIONS = (
    "You are the customer support assistant of Lumen, an online home goods store. Answer the "
    "customer's last message in one or two short sentences, using their details below."
)
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Elif",
    "Femi",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Liam",
    "Mara",
    "Noor",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
    "Zoe",
]
TIERS = ["Basic", "Plus", "Premium"]
PRODUCTS = [
    "blue teapot",
    "oak side table",
    "linen duvet cover",
    "cast-iron skillet",
    "floor lamp",
    "wool rug",
    "set of 6 glasses",
    "bamboo bath mat",
    "ceramic vase",
    "desk chair",
    "pillow pair",
    "wall clock",
]
CARRIERS = ["DHL", "UPS", "DPD", "Royal Mail"]
DAYS = ["3 March", "9 March", "14 March", "21 March", "2 April", "11 April", "18 April", "27 April"]
STATUSES = ["processing", "shipped", "delivered"]

OPENERS = [
    "Hi, I have a question about my order.",
    "Hello!",
    "hi there",
    "Good morning, quick question.",
    "Hey, I need some help with an order.",
    "Hi, it's {name}.",
    "Hello, this is about order {order}.",
    "hi, I bought a {product} from you",
    "Good evening. I need help please.",
    "Hey Lumen team",
    "Hi! Question about my {product}.",
    "hello, {name} here, I have a problem with an order",
]
FOLLOW_UPS = [
    "It's the {product} I ordered on {ordered}.",
    "It's about the {product}.",
    "The order with the {product} in it.",
]
QUESTIONS = {
    "track": [
        "Where is it?",
        "When will it arrive?",
        "Has it shipped yet?",
        "Any news on the delivery?",
        "how long until it gets here?",
    ],
    "cancel": [
        "Can I still cancel it?",
        "I'd like to cancel it please.",
        "Please cancel the order, I changed my mind.",
    ],
    "return": ["How do I send it back?", "Can I return it?", "It's not what I expected, can I return it?"],
    "damaged": ["It arrived broken. What now?", "The box was crushed and it's damaged.", "It came cracked."],
    "address": ["Can you send it to my office instead?", "I moved last week, can I change the delivery address?"],
}
INTENTS = {
    "processing": ["track", "cancel", "address"],
    "shipped": ["track", "cancel", "address"],
    "delivered": ["return", "damaged", "track"],
}


def customer(rng: random.Random, i: int) -> dict:
    status = rng.choice(STATUSES)
    ordered, eta = sorted(rng.sample(DAYS, 2), key=DAYS.index)
    return {
        "name": rng.choice(NAMES),
        "tier": rng.choice(TIERS),
        "since": rng.randint(2012, 2024),
        "order": f"LM-{10000 + 37 * i % 90000:05d}",
        "product": rng.choice(PRODUCTS),
        "status": status,
        "carrier": rng.choice(CARRIERS),
        "ordered": ordered,
        "eta": eta,
        "amount": f"{rng.randint(12, 240)}.00",
    }


def system_prompt(c: dict) -> str:
    status = {
        "processing": f"being prepared in our warehouse (ordered {c['ordered']})",
        "shipped": f"shipped with {c['carrier']}, expected {c['eta']}",
        "delivered": f"delivered on {c['eta']}",
    }[c["status"]]
    return (
        f"{INSTRUCTIONS}\nCustomer: {c['name']}, {c['tier']} member since {c['since']}.\n"
        f"Last order: {c['order']}, {c['product']}, EUR {c['amount']}, {status}."
    )


def reference(c: dict, intent: str) -> str:
    """A correct reply from the customer's details: what a good support agent would say."""
    free = c["tier"] == "Premium"
    if intent == "track":
        return {
            "processing": f"Your {c['product']} is still being prepared and will ship within two days.",
            "shipped": f"Your {c['product']} is on its way with {c['carrier']} and should arrive by {c['eta']}.",
            "delivered": f"Order {c['order']} was delivered on {c['eta']}; if you can't find it, let me know "
            "and I'll open a claim with the carrier.",
        }[c["status"]]
    if intent == "cancel":
        if c["status"] == "processing":
            return f"Done: order {c['order']} is cancelled and EUR {c['amount']} will be back on your card in 3-5 days."
        return (
            f"Order {c['order']} has already shipped, so I can't cancel it, but you can return it for free "
            "once it arrives."
        )
    if intent == "address":
        if c["status"] == "processing":
            return "Of course: reply with the new address and I'll update the order before it ships."
        return f"It's already with {c['carrier']}; I've sent you their link to redirect the parcel."
    if intent == "return":
        pickup = "we'll collect it from your door for free" if free else "I've emailed you a prepaid return label"
        return f"You can return the {c['product']} within 30 days of delivery: {pickup}."
    replacement = "a replacement ships today at no cost" if free else "a replacement ships once you send a photo"
    return f"I'm sorry it arrived damaged; {replacement}."


def chat(rng: random.Random, i: int) -> dict:
    c = customer(rng, i)
    intent = rng.choice(INTENTS[c["status"]])
    turns = [
        {"role": "system", "content": system_prompt(c)},
        {"role": "user", "content": rng.choice(OPENERS).format(**c)},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
    ]
    if rng.random() < 0.4:  # one or two earlier exchanges
        turns += [
            {"role": "user", "content": rng.choice(FOLLOW_UPS).format(**c)},
            {"role": "assistant", "content": f"Thanks, I can see order {c['order']}. What would you like to do?"},
        ]
    turns.append({"role": "user", "content": rng.choice(QUESTIONS[intent])})
    return {"id": f"c{i:05d}", "messages": turns, "intent": intent, "reference": reference(c, intent)}


def generate(n: int = N_CHATS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    return [chat(rng, i) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "chats.jsonl")
    parser.add_argument("--n", type=int, default=N_CHATS)
    args = parser.parse_args()
    rows = generate(args.n)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} chats to {args.out}")


if __name__ == "__main__":
    main()
