"""Benchmark the local teacher's shared-prefix KV cache against plain batched generation.

    .venv/bin/python bench/bench_local_teacher.py [--prompts 64] [--batch 16] [--quick]

The embedded SmolLM2-135M as the demo's teacher (the task's instructions and 12 worked
examples, ~430 tokens, before each prompt; decoding constrained to the 12 labels), on the
first N demo prompts, in batches: once through plain left-padded `generate_batch`, once with
a `PrefixCache`, twice each, interleaved, best of two. Writes bench/results/local_teacher.json
(bench/harness.py: envelope and figures) with prompts/s per arm, the speed-up, and how many
answers are identical between the arms. --quick: 4 prompts in one batch, once each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=None, help="default 64 (quick: 4)")
    parser.add_argument("--batch", type=int, default=None, help="default 16 (quick: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm, best kept; default 2 (quick: 1)")
    harness.add_arguments(parser)
    args = parser.parse_args()
    args.prompts = args.prompts or (4 if args.quick else 64)
    args.batch = args.batch or (4 if args.quick else 16)
    args.repeats = args.repeats or (1 if args.quick else 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.artifacts import read_jsonl
    from pipeline.conversation import user_turn
    from pipeline.llm.encoding import PrefixCache
    from pipeline.llm.generate import generate_batch
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.task import load_task

    task = load_task(ROOT / "data" / "task.yaml")
    rows = read_jsonl(ROOT / "data" / "prompts.jsonl")[: args.prompts]
    conversations = [task.teacher_messages(user_turn(r["prompt"])) for r in rows]
    tokenizer, model = load_tokenizer(MODEL), load_model(MODEL, device_plan()).eval()

    def run(cache: PrefixCache | None) -> tuple[float, list[str]]:
        start, answers = time.perf_counter(), []
        for i in range(0, len(conversations), args.batch):
            answers += [
                c.text
                for c in generate_batch(
                    model, tokenizer, conversations[i : i + args.batch], 8, task.labels, prefix_cache=cache
                )
            ]
        return time.perf_counter() - start, answers

    walls: dict[str, list[float]] = {"plain": [], "prefix_cache": []}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for arm, cache in (("plain", None), ("prefix_cache", PrefixCache())):
            wall, answers[arm] = run(cache)
            walls[arm].append(wall)
    best = {arm: min(w) for arm, w in walls.items()}
    same = sum(a == b for a, b in zip(answers["plain"], answers["prefix_cache"]))
    prompt_tokens = len(tokenizer.apply_chat_template(conversations[0], add_generation_prompt=True)["input_ids"])
    result = {
        "prompts": len(conversations),
        "batch": args.batch,
        "prompt_tokens_first": prompt_tokens,
        "wall_s": walls,
        "prompts_per_s": {arm: len(conversations) / w for arm, w in best.items()},
        "speedup": best["plain"] / best["prefix_cache"],
        "identical_answers": same,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": f"python bench/bench_local_teacher.py --prompts {args.prompts} --batch {args.batch}",
    }
    harness.write("local_teacher", result, args)
    print(json.dumps({k: result[k] for k in ("prompts_per_s", "speedup", "identical_answers")}, indent=1))


if __name__ == "__main__":
    main()
