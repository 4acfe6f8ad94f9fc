"""Where a CPU LoRA step goes, by op: the recipe's settings with TRL's own loss vs the finetune
stage's answer-only loss (pipeline/llm/trainer.py), profiled over the same steps.

    .venv/bin/python bench/bench_finetune_profile.py [--examples 64] [--steps 4] [--quick]

The embedded SmolLM2-135M, the smollm2-135m-cpu recipe's train section (padding-free, batch 8,
LoRA r 16 on every linear layer), the first --examples prompts of data/prompts.jsonl with their
gold label as the completion (the data bench_finetune.py uses). Per arm, torch.profiler records
--steps optimizer steps after two warm-up steps: the steps' wall time, the share of CPU time
spent inside TRL's fused LM head (its chunked log-prob function, forward and backward: the
vocabulary projection of every position), and the top ops by self CPU time. Writes
bench/results/finetune_profile.json (bench/harness.py). --quick: 16 examples, 1 step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402
from bench_finetune import load_rows, recipe_trainer  # noqa: E402

WARMUP_STEPS = 2
TOP_OPS = 8
# TRL's fused LM head: its autograd function's forward and backward (not the autograd engine's
# event wrapping the backward, which holds the same time again).
FUSED_HEAD = ("ChunkedLogProbFunction", "ChunkedLogProbFunctionBackward")


def profiled_steps(trainer_cls, rows, base: str, train, out: Path, steps: int) -> dict:
    """Train `WARMUP_STEPS + steps` steps; profile the last `steps`."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    record: dict = {}

    class Profiler(TrainerCallback):
        def on_step_begin(self, _args, state, _control, **_kw):
            if state.global_step == WARMUP_STEPS:
                record["profile"] = profile(activities=[ProfilerActivity.CPU])
                record["profile"].__enter__()
                record["start"] = time.perf_counter()

        def on_step_end(self, _args, state, _control, **_kw):
            if state.global_step == WARMUP_STEPS + steps:
                record["wall_s"] = time.perf_counter() - record["start"]
                record["profile"].__exit__(None, None, None)

    trainer = recipe_trainer(trainer_cls, rows, base, train, out, WARMUP_STEPS + steps, [Profiler()])
    trainer.train()
    return summarise(record["profile"].key_averages(), record["wall_s"], steps)


def summarise(events, wall_s: float, steps: int) -> dict:
    total = sum(e.self_cpu_time_total for e in events)
    head = sum(e.cpu_time_total for e in events if e.key in FUSED_HEAD)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    return {
        "steps": steps,
        "wall_s": wall_s,
        "s_per_step": wall_s / steps,
        "cpu_s": total / 1e6,
        "fused_lm_head_share": head / total,
        "top_ops": [
            {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total}
            for e in top
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=None, help="default 64 (quick: 16)")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps per arm; default 4 (quick: 1)")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    args.examples = args.examples or (16 if args.quick else 64)
    args.steps = args.steps or (1 if args.quick else 4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from trl import SFTTrainer

    from pipeline.config import load_recipe
    from pipeline.llm.loading import resolve_model
    from pipeline.llm.trainer import trainer_class

    recipe = load_recipe("smollm2-135m-cpu", root=ROOT)
    base = resolve_model(recipe.model.base)
    rows = load_rows(args.examples)
    arms = {"trl_loss": SFTTrainer, "answer_only_loss": trainer_class()}
    results: dict = {"recipe": "smollm2-135m-cpu", "examples": len(rows), "arms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in arms.items():
            results["arms"][name] = arm = profiled_steps(cls, rows, base, recipe.train, Path(tmp) / name, args.steps)
            print(
                f"{name:>17}: {arm['s_per_step']:.2f} s/step, fused LM head {arm['fused_lm_head_share']:.1%} of CPU time"
            )
    results["answer_only_speedup"] = (
        results["arms"]["trl_loss"]["s_per_step"] / results["arms"]["answer_only_loss"]["s_per_step"]
    )
    print(json.dumps({k: v["top_ops"][:4] for k, v in results["arms"].items()}, indent=1))
    harness.write("finetune_profile", results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
