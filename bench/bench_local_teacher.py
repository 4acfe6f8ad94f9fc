"""Benchmark the local teacher's shared-prefix KV cache against plain batched generation.

    .venv/bin/python bench/bench_local_teacher.py [--prompts 64] [--batch 16]

The embedded SmolLM2-135M as the demo's teacher (the task's instructions and 12 worked
examples, ~430 tokens, before each prompt; decoding constrained to the 12 labels), on the
first N demo prompts, in batches: once through plain left-padded `generate_batch`, once with
a `PrefixCache`, twice each, interleaved, best of two. Writes bench/local_teacher.json with
prompts/s per arm, the speed-up, and how many answers are identical between the arms.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "embedded:smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "local_teacher.json")
    args = parser.parse_args()

    from pipeline.artifacts import atomic_write_json, read_jsonl
    from pipeline.llm.generate import PrefixCache, generate_batch
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.task import load_task

    task = load_task(ROOT / "data" / "task.yaml")
    rows = read_jsonl(ROOT / "data" / "prompts.jsonl")[: args.prompts]
    conversations = [task.teacher_messages(r["prompt"]) for r in rows]
    tokenizer, model = load_tokenizer(MODEL), load_model(MODEL, device_plan()).eval()

    def run(cache: PrefixCache | None) -> tuple[float, list[str]]:
        start, answers = time.perf_counter(), []
        for i in range(0, len(conversations), args.batch):
            answers += [c.text for c in generate_batch(model, tokenizer, conversations[i : i + args.batch], 8,
                                                       task.labels, prefix_cache=cache)]
        return time.perf_counter() - start, answers

    walls: dict[str, list[float]] = {"plain": [], "prefix_cache": []}
    answers: dict[str, list[str]] = {}
    for _ in range(2):
        for arm, cache in (("plain", None), ("prefix_cache", PrefixCache())):
            wall, answers[arm] = run(cache)
            walls[arm].append(wall)
    best = {arm: min(w) for arm, w in walls.items()}
    same = sum(a == b for a, b in zip(answers["plain"], answers["prefix_cache"]))
    prompt_tokens = len(tokenizer.apply_chat_template(conversations[0], add_generation_prompt=True)["input_ids"])
    result = {
        "prompts": len(conversations), "batch": args.batch, "prompt_tokens_first": prompt_tokens,
        "wall_s": walls, "prompts_per_s": {arm: len(conversations) / w for arm, w in best.items()},
        "speedup": best["plain"] / best["prefix_cache"], "identical_answers": same,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "command": f"python bench/bench_local_teacher.py --prompts {args.prompts} --batch {args.batch}",
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("prompts_per_s", "speedup", "identical_answers")}, indent=1))


if __name__ == "__main__":
    main()
