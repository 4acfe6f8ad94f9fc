"""Benchmark a local teacher's capture with the label distribution (`teacher.label_distribution`)
against plain capture: what recording every label's log-likelihood costs on top of the answer.

    .venv/bin/python bench/bench_label_capture.py [--prompts 32] [--repeats 3] [--quick]

The demo's local teacher: the embedded SmolLM2-135M (fp32), data/task.yaml's instructions and
worked examples before each of the first --prompts prompts of data/prompts.jsonl, a PrefixCache,
batches of 16, answers constrained to the 12 labels. Arms, interleaved, best of --repeats:

    plain                  constrained generation only
    distribution           generation, then the label trie from generate's own KV cache
                           (pipeline.llm.generate.generate_batch with score_labels: what capture runs)
    distribution_separate  generation, then a separate trie scoring pass that runs the prompts
                           again from the prefix cache (pipeline.llm.scoring.label_logprobs)
    distribution_bucketed  generation, then per-label buckets (bench_label_scoring.py's baseline)

and the largest |distribution - distribution_separate| label log-likelihood. Writes
bench/results/label_capture.json (bench/harness.py). --quick: 4 prompts, once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402
from bench_label_scoring import MODEL, bucketed_label_token_logprobs, timed  # noqa: E402

BATCH = 16
MAX_NEW_TOKENS = 8


def capture_arms(model, tokenizer, n_prompts: int, repeats: int) -> dict:
    from pipeline.artifacts import read_jsonl
    from pipeline.conversation import user_turn
    from pipeline.llm.encoding import PrefixCache
    from pipeline.llm.generate import generate_batch
    from pipeline.llm.scoring import label_logprobs
    from pipeline.task import load_task

    task = load_task(ROOT / "data" / "task.yaml")
    convs = [
        task.teacher_messages(user_turn(r["prompt"])) for r in read_jsonl(ROOT / "data" / "prompts.jsonl")[:n_prompts]
    ]
    batches = [convs[i : i + BATCH] for i in range(0, len(convs), BATCH)]

    def generate(b, cache, **kw):
        return generate_batch(model, tokenizer, b, MAX_NEW_TOKENS, task.labels, prefix_cache=cache, **kw)

    def plain(cache):
        return [(c.text, None) for b in batches for c in generate(b, cache)]

    def distribution(cache):
        return [(c.text, c.label_logprobs) for b in batches for c in generate(b, cache, score_labels=task.labels)]

    def generated_then(scorer):
        """Generation, then `scorer` over the same batch: a second pass that runs the prompts again."""

        def run(cache):
            out = []
            for b in batches:
                texts = [c.text for c in generate(b, cache)]
                out += zip(texts, scorer(model, tokenizer, b, task.labels, cache))
            return out

        return run

    arms = {
        "plain": plain,
        "distribution": distribution,
        "distribution_separate": generated_then(label_logprobs),
        "distribution_bucketed": generated_then(bucketed_label_token_logprobs),
    }
    walls: dict[str, list[float]] = {arm: [] for arm in arms}
    outputs = {}
    for _ in range(repeats):
        for arm, fn in arms.items():
            wall, _, outputs[arm] = timed(lambda fn=fn: fn(PrefixCache()))
            walls[arm].append(wall)
    best = {arm: min(w) for arm, w in walls.items()}
    return {
        "prompts": len(convs),
        "batch": BATCH,
        "labels": len(task.labels),
        "wall_s": walls,
        "prompts_per_s": {arm: len(convs) / w for arm, w in best.items()},
        "distribution_over_plain": {arm: best[arm] / best["plain"] for arm in arms if arm != "plain"},
        "identical_answers": sum(a[0] == b[0] for a, b in zip(outputs["plain"], outputs["distribution"])),
        "max_abs_logprob_difference": max(
            abs(a[1][label] - b[1][label])
            for a, b in zip(outputs["distribution"], outputs["distribution_separate"])
            for label in task.labels
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=None, help="demo prompts; default 32 (quick: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm, interleaved; default 3 (quick: 1)")
    harness.add_arguments(parser)
    args = parser.parse_args()
    args.prompts = args.prompts or (4 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    model = load_model(MODEL, device_plan()).eval()
    capture = capture_arms(model, load_tokenizer(MODEL), args.prompts, args.repeats)
    result = {
        "model": MODEL,
        "capture": capture,
        "command": f"python bench/bench_label_capture.py --prompts {args.prompts} --repeats {args.repeats}"
        + (" --quick" if args.quick else ""),
    }
    harness.write("label_capture", result, args)
    print(json.dumps(capture["distribution_over_plain"] | {"identical": capture["identical_answers"]}, indent=1))


if __name__ == "__main__":
    main()
