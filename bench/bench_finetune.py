"""CPU training throughput: the embedded recipe's finetune settings vs a plain TRL SFTTrainer.

    .venv/bin/python bench/bench_finetune.py [--examples 96] [--variants recipe,padding_free,group_by_length] [--quick]

Same data for every run: the first N prompts of data/prompts.jsonl with their gold label as
the completion, one epoch, the embedded SmolLM2-135M with the same LoRA. Throughput counts
real (non-padding) tokens: the sum of the tokenized examples' lengths over the run's wall
time. The roofline fraction uses ~4*N FLOPs per token for LoRA training (forward 2N, input
gradients 2N, no weight gradients for the frozen base) against this machine's measured fp32
matmul rate. Writes bench/results/finetune.json (bench/harness.py: envelope and figures).
--quick: 4 examples, TRL defaults vs padding_free only.
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


def matmul_gflops(n: int = 1024, repeats: int = 20, trials: int = 3) -> float:
    """The best of `trials` timings: a shared machine only ever slows a trial down."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


def native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions; without them TRL's bf16 default runs ~400x slower
    matmuls and its arm would take most of an hour."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: run it and let the figure say
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_rows(count: int) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "data" / "prompts.jsonl").read_text().splitlines()[:count]]
    return [{"prompt": r["prompt"], "completion": r["gold"]} for r in rows]


def timed_train(trainer) -> tuple[float, int]:
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, tokens


def run_baseline(rows, base: str, lora, out: Path, bf16: bool | None = None) -> dict:
    """TRL with its defaults (padding to the batch max, gradient checkpointing, lr 2e-5, full-sequence
    loss). TRL 1.x's SFTConfig turns bf16 autocast on by default even with use_cpu=True, and this
    CPU has no native bf16: `bf16=False` is the same defaults with only that switched off, the
    baseline a CPU user actually gets once they notice."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from pipeline.stages.finetune import build_lora_config, to_prompt_completion

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=SFTConfig(
            output_dir=str(out),
            num_train_epochs=1,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=1000,
            disable_tqdm=True,
            **({} if bf16 is None else {"bf16": bf16}),
        ),
        train_dataset=to_prompt_completion(Dataset.from_list(rows), "user"),
        processing_class=AutoTokenizer.from_pretrained(base),
        peft_config=build_lora_config(lora),
    )
    wall, tokens = timed_train(trainer)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "steps": trainer.state.global_step,
        "loss": trainer.state.log_history[-1].get("train_loss"),
    }


def recipe_trainer(trainer_cls, rows, base: str, train, out: Path, max_steps: int | None = None, callbacks=()):
    """A trainer set up as the finetune stage sets one up (its tokenization and builders, the
    recipe's train section), saving nothing and logging nothing; `trainer_cls` picks the loss."""
    from datasets import Dataset

    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.stages.finetune import build_lora_config, build_sft_config, to_prompt_completion, tokenize_dataset

    plan = device_plan()
    tokenizer = load_tokenizer(base)
    args = build_sft_config(train, out, plan)
    args.save_strategy, args.logging_steps, args.disable_tqdm = "no", 1000, True
    if max_steps is not None:
        args.max_steps = max_steps
    return trainer_cls(
        model=load_model(base, plan),
        args=args,
        train_dataset=tokenize_dataset(
            to_prompt_completion(Dataset.from_list(rows), "user"), tokenizer, train.max_seq_len
        ),
        processing_class=tokenizer,
        peft_config=build_lora_config(train.lora),
        callbacks=list(callbacks),
    )


def run_ours(rows, base: str, train, out: Path) -> dict:
    """The finetune stage's own tokenization, builders and trainer, with the recipe's train section."""
    from pipeline.llm.trainer import trainer_class

    trainer = recipe_trainer(trainer_class(), rows, base, train, out)
    wall, tokens = timed_train(trainer)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "steps": trainer.state.global_step,
        "loss": trainer.state.log_history[-1].get("train_loss"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=None, help="default 96 (quick: 4)")
    parser.add_argument("--recipe", default="smollm2-135m-cpu")
    parser.add_argument(
        "--variants",
        default=None,
        help="recipe = the recipe's train section; padding_free / group_by_length switch that on too "
        "(default recipe,padding_free,group_by_length; quick: padding_free)",
    )
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    args.examples = args.examples or (4 if args.quick else 96)
    args.variants = args.variants or ("padding_free" if args.quick else "recipe,padding_free,group_by_length")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    from pipeline.config import load_recipe
    from pipeline.llm.loading import resolve_model

    recipe = load_recipe(args.recipe, root=ROOT)
    base = resolve_model(recipe.model.base)
    rows = load_rows(args.examples)
    train = recipe.train.model_copy(update={"epochs": 1.0, "max_steps": None})
    gflops = matmul_gflops(repeats=5 if args.quick else 20)
    from transformers import AutoConfig

    from pipeline.planner import Architecture

    n_params = Architecture.from_config(AutoConfig.from_pretrained(base).to_dict()).params
    results: dict = {
        "machine": {"threads": torch.get_num_threads(), "fp32_matmul_gflops": gflops},
        "examples": len(rows),
        "recipe": args.recipe,
        "params": n_params,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"trl_default_fp32": lambda: run_baseline(rows, base, train.lora, Path(tmp) / "fp32", bf16=False)}
        if native_bf16():
            runs = {"trl_default": lambda: run_baseline(rows, base, train.lora, Path(tmp) / "baseline")} | runs
        else:
            results["skipped"] = {"trl_default": "no bf16 instructions on this CPU (avx512_bf16 / amx_bf16)"}
        for variant in args.variants.split(","):
            update = {} if variant == "recipe" else {variant: True}
            runs[variant] = lambda u=update, v=variant: run_ours(rows, base, train.model_copy(update=u), Path(tmp) / v)
        for name, fn in runs.items():
            torch.manual_seed(0)
            r = fn()
            r["tokens_per_s"] = r["tokens"] / r["wall_s"]
            r["roofline_fraction"] = r["tokens_per_s"] * 4 * n_params / (gflops * 1e9)
            results["runs"][name] = r
            print(
                f"{name:>16}: {r['tokens_per_s']:7.1f} real tokens/s, {r['wall_s']:6.1f} s, "
                f"{r['roofline_fraction']:.1%} of fp32 matmul roofline, loss {r['loss']}",
                flush=True,
            )
    for baseline in [b for b in ("trl_default", "trl_default_fp32") if b in results["runs"]]:
        base_tps = results["runs"][baseline]["tokens_per_s"]
        results[f"speedup_vs_{baseline}"] = {k: v["tokens_per_s"] / base_tps for k, v in results["runs"].items()}
    print(json.dumps(results["speedup_vs_trl_default_fp32"], indent=1))
    harness.write("finetune", results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
