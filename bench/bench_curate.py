"""Benchmark the curate stage on 10,000 synthetic teacher records, TF-IDF and MiniLM selection.

    .venv/bin/python bench/bench_curate.py [--records 10000] [--target 2000] [--embeddings tfidf,minilm] [--quick]

Records are the demo prompts (data/prompts.jsonl) replicated with variations: random word
drops and swaps, added sentences, some exact repeats, refusals, cut-off answers, failed
calls, off-label answers. Each embeddings backend curates the same records; MiniLM's time is
reported against TF-IDF's. Writes bench/results/curate.json (bench/harness.py: envelope and
figures) with the wall time and the stage's counts per backend. The issue's budget is 120 s
for 10k records on the 2-core dev machine. --quick: 500 records, target 100.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402

EXTRAS = [
    "Thanks.",
    "Please help.",
    "This is urgent.",
    "I ordered last week.",
    "My name is Sam.",
    "I have been waiting for days.",
    "Can you check?",
    "Regards.",
]


def vary(prompt: str, rng: random.Random) -> str:
    """A variant: drop or swap a word, or add a sentence, so some are near-duplicates and some are not."""
    words = prompt.split()
    roll = rng.random()
    if roll < 0.3 and len(words) > 3:
        del words[rng.randrange(len(words))]
    elif roll < 0.6 and len(words) > 3:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        words += rng.sample(EXTRAS, k=rng.randint(1, 3))
    return " ".join(words)


def synthesise(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    prompts = [json.loads(line) for line in (ROOT / "data" / "prompts.jsonl").read_text().splitlines()]
    records = []
    for i in range(n):
        base = prompts[i % len(prompts)]
        text = base["prompt"] if i < len(prompts) or rng.random() < 0.05 else vary(base["prompt"], rng)
        answer, finish, error = base["gold"], "stop", None
        roll = rng.random()
        if roll < 0.02:
            answer = "I'm sorry, but I can't help with that request."
        elif roll < 0.04:
            answer, finish = "The customer seems to be asking about", "length"
        elif roll < 0.05:
            answer, error = "", "HTTP 500"
        elif roll < 0.08:
            answer = "shipping_question"
        records.append(
            {
                "id": f"b{i:06d}",
                "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}],
                "meta": {
                    "teacher": "openai:bench",
                    "gold": base["gold"],
                    "logprobs": -rng.random(),
                    "finish_reason": finish,
                    "error": error,
                    "cost_usd": 0.0001,
                },
            }
        )
    return records


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=None, help="default 10,000 (quick: 500)")
    parser.add_argument("--target", type=int, default=None, help="default 2,000 (quick: 100)")
    parser.add_argument("--embeddings", default="tfidf,minilm", help="comma-separated backends, tfidf first")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    records_n = args.records or (500 if args.quick else 10_000)
    target = args.target or (100 if args.quick else 2_000)

    from pipeline.config import Recipe
    from pipeline.llm.loading import load_tokenizer
    from pipeline.stages import curate
    from pipeline.tracking import NullTracker

    load_tokenizer(Recipe(name="bench").model.base)  # resolve/convert the embedded model outside the timed region
    records = synthesise(records_n)
    result: dict = {
        "records": records_n,
        "target_size": target,
        "budget_s": 120,
        "cpu_count": os.cpu_count(),
        "arms": {},
    }
    for backend in args.embeddings.split(","):
        recipe = Recipe(name="bench", curate={"target_size": target, "embeddings": backend, "min_examples": 20})
        with tempfile.TemporaryDirectory() as tmp:
            capture = Path(tmp) / "capture"
            capture.mkdir()
            (capture / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            out = Path(tmp) / "curate"
            out.mkdir()
            start = time.perf_counter()
            manifest = curate.run(recipe, {"task": ROOT / "data" / "task.yaml", "capture": capture}, out, NullTracker())
            wall = time.perf_counter() - start
        result["arms"][backend] = {
            "wall_s": round(wall, 2),
            "within_budget": wall * 10_000 / records_n <= 120,
            "counts": manifest.counts,
        }
        print(f"{backend}: {wall:.2f} s", flush=True)
    harness.write("curate", result, args)


if __name__ == "__main__":
    main()
