"""Benchmark evaluate's slow part on Banking77: the tuned student answering held-out queries as
served (label posterior over 77 intents), trie scoring against the per-label buckets it replaced
and against the compute ceiling.

    .venv/bin/python bench/bench_label_evaluate.py [RUN_DIR] [--rows 64] [--repeats 1] [--quick]

RUN_DIR: a finished Banking77 run (default runs/banking77-cpu, what `distill run banking77-cpu`
writes): its resolved recipe, curated validation split and LoRA adapter, loaded as `distill
evaluate` loads them (the base model with the adapter unmerged). Its first --rows validation rows
are answered by `pipeline.evaluation.answering.answer_all`, the function evaluate runs for the
tuned student on test and validation, in the recipe's batches (eval.batch_size). Arms, interleaved,
best of --repeats, seconds per row:

    bucketed        evaluate before the trie: answer_all with label scoring swapped for the
                    per-label-bucket method (bench_label_scoring.bucketed_label_token_logprobs),
                    the adapter unmerged
    trie_unmerged   the trie, the adapter unmerged
    trie            answer_all as shipped (the trie, the adapter merged into the fp32 base while
                    it answers: pipeline.evaluation.answering.adapter_merged)

and the compute ceiling: the floating-point work of scoring every label exactly after each row's
prompt (bench_label_scoring.gflop_per_request) at this CPU's fp32 matmul rate
(bench_finetune.matmul_gflops), the fewest seconds per row any exact scorer could take here.

Evaluate's other work (the base student, metrics, plots, MLflow) is not timed. Writes
bench/results/label_evaluate.json (bench/harness.py). --quick: 8 rows, once. Without a finished
run (a fresh clone has no runs/) it says so on stderr and exits 0, writing nothing.
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
from bench_finetune import matmul_gflops  # noqa: E402
from bench_label_scoring import bucketed_label_token_logprobs, gflop_per_request, timed  # noqa: E402


def load_run(run: Path):
    """The tuned student, its tokenizer, recipe, task, validation rows and student view, as evaluate loads them."""
    from datasets import load_from_disk
    from peft import PeftModel

    from pipeline.artifacts import CURATED_DATASET, FINETUNE_ADAPTER
    from pipeline.config import load_recipe
    from pipeline.conversation import read_student_view
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.task import load_task

    recipe = load_recipe(str(run / "evaluate" / "resolved_config.yaml"), root=ROOT)
    task = load_task(ROOT / recipe.capture.task)
    tokenizer = load_tokenizer(recipe.model.base, recipe.model.chat_template)
    base = load_model(recipe.model.base, device_plan()).eval()
    tuned = PeftModel.from_pretrained(base, str(run / "finetune" / FINETUNE_ADAPTER)).eval()
    validation = list(load_from_disk(str(run / "curate" / CURATED_DATASET), keep_in_memory=True)["validation"])
    return tuned, tokenizer, recipe, task, validation, read_student_view(run / "curate").shape


def arms(model, tokenizer, recipe, task, rows, shape) -> dict:
    import contextlib

    import pipeline.evaluation.answering as answering
    import pipeline.llm.generate as generate

    def answers(scorer, merged: bool):
        def run():
            shipped = generate.label_token_logprobs, answering.adapter_merged
            generate.label_token_logprobs = scorer  # what decode=label_posterior scores with
            if not merged:
                answering.adapter_merged = lambda _model: contextlib.nullcontext()
            try:
                return answering.answer_all(model, tokenizer, rows, recipe, task, "bench", shape).completions
            finally:
                generate.label_token_logprobs, answering.adapter_merged = shipped

        return run

    trie = generate.label_token_logprobs
    return {
        "bucketed": answers(bucketed_label_token_logprobs, merged=False),
        "trie_unmerged": answers(trie, merged=False),
        "trie": answers(trie, merged=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=ROOT / "runs" / "banking77-cpu")
    parser.add_argument("--rows", type=int, default=None, help="validation rows; default 64 (quick: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm, interleaved; default 1")
    harness.add_arguments(parser)
    args = parser.parse_args()
    args.rows = args.rows or (8 if args.quick else 64)
    args.repeats = args.repeats or 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.run / "evaluate").is_dir():
        print(
            f"bench_label_evaluate: no finished run at {args.run} (run `distill run banking77-cpu` first, or pass "
            "RUN_DIR): skipped, nothing written; the committed bench/results/label_evaluate.json stays",
            file=sys.stderr,
        )
        return

    from pipeline.llm.policy import label_posterior

    model, tokenizer, recipe, task, validation, shape = load_run(args.run)
    rows = validation[: args.rows]
    for warm_up in arms(model, tokenizer, recipe, task, rows[:2], shape).values():
        warm_up()  # untimed: the first call of each shape pays the allocator's and kernels' warm-up
    timed_arms = arms(model, tokenizer, recipe, task, rows, shape)
    walls: dict[str, list[float]] = {arm: [] for arm in timed_arms}
    outputs = {}
    for _ in range(args.repeats):
        for arm, fn in timed_arms.items():
            wall, _, outputs[arm] = timed(fn)
            walls[arm].append(wall)
    per_row = {arm: min(w) / len(rows) for arm, w in walls.items()}
    confidence = {arm: [max(label_posterior(c)[1].values()) for c in outputs[arm]] for arm in timed_arms}
    work = gflop_per_request(model, tokenizer, [c.prompt_tokens for c in outputs["trie"]], task.labels)
    rate = matmul_gflops()
    result = {
        "run": str(args.run.relative_to(ROOT)) if args.run.is_relative_to(ROOT) else str(args.run),
        "model": f"{recipe.model.base} + LoRA adapter",
        "labels": len(task.labels),
        "rows": len(rows),
        "batch": recipe.eval.batch_size,
        "wall_s": walls,
        "s_per_row": per_row,
        "trie_speedup_over_bucketed": per_row["bucketed"] / per_row["trie"],
        "trie_unmerged_speedup_over_bucketed": per_row["bucketed"] / per_row["trie_unmerged"],
        "compute": {
            "gflop_per_row": work,
            "fp32_matmul_gflops": rate,
            "ceiling_s_per_row": work / rate,
            "ceiling_speedup_over_bucketed": per_row["bucketed"] * rate / work,
            "trie_share_of_ceiling": work / rate / per_row["trie"],
        },
        "identical_answers": sum(t.text == b.text for t, b in zip(outputs["trie"], outputs["bucketed"])),
        "max_confidence_difference": max(abs(t - b) for t, b in zip(confidence["trie"], confidence["bucketed"])),
        "command": f"python bench/bench_label_evaluate.py --rows {args.rows} --repeats {args.repeats}"
        + (" --quick" if args.quick else ""),
    }
    harness.write("label_evaluate", result, args)
    print(json.dumps({k: result[k] for k in ("s_per_row", "trie_speedup_over_bucketed", "compute")}, indent=1))


if __name__ == "__main__":
    main()
