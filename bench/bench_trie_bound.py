"""How much of the label trie a pruned scorer could skip and still give the same confidences.

    .venv/bin/python bench/bench_trie_bound.py [MODEL_DIR] [--prompts 16] [--quick]

A pruned trie scorer skips a branch once its prefix is so unlikely that no label below it can
move the posterior: to keep every confidence within ~1e-4 over 77 labels at the fitted posterior
temperature, a label may be dropped only below about 1e-7 of the best label's probability. This
bench scores every label exactly (pipeline.llm.scoring) and counts, per prompt, the inner trie
nodes an oracle pruner would still have to run at that bound (a node runs when its own prefix
probability is at least eps x the best label's), and at looser bounds that would change the
confidences. It is the ceiling on what pruning can save, whatever the search order.

MODEL_DIR: a trained student (default runs/banking77-cpu/export/merged, what `distill run
banking77-cpu` or `make loop-sim RECIPE=banking77-cpu` writes); the prompts are its validation
split's first --prompts. Writes bench/results/trie_bound.json (bench/harness.py).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402

BOUNDS = (1e-7, 1e-4, 1e-2)


def nodes_to_run(row: dict[str, list[float]], labels: list[str], trie, eps: float) -> int:
    """Inner nodes whose own prefix log-prob is within log(eps) of the best label's: the rest
    score only labels below the bound."""
    best = max(sum(v) for v in row.values())
    prefix: dict[int, float] = {}
    for label, path in zip(labels, trie.paths):
        total = 0.0
        for node, logprob in zip(path, row[label]):
            total += logprob
            prefix[node] = total
    return sum(1 for node in trie.inner_nodes() if prefix[node] >= best + math.log(eps))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=ROOT / "runs" / "banking77-cpu" / "export" / "merged")
    parser.add_argument("--prompts", type=int, default=None, help="validation prompts scored; default 16 (quick: 4)")
    harness.add_arguments(parser)
    args = parser.parse_args()
    n = args.prompts or (4 if args.quick else 16)

    import yaml

    from pipeline.artifacts import read_jsonl
    from pipeline.llm.label_trie import LabelTrie
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.llm.scoring import label_token_ids, label_token_logprobs

    if not (args.model / "config.json").is_file():
        sys.exit(f"error: {args.model}: no trained student (run `distill run banking77-cpu` first)")
    labels = yaml.safe_load((ROOT / "data" / "banking77_task.yaml").read_text())["labels"]
    validation = args.model.parents[1] / "curate" / "validation.jsonl"
    convs = [r["messages"][:-1] for r in read_jsonl(validation)[:n]]
    model, tokenizer = load_model(str(args.model), device_plan()).eval(), load_tokenizer(str(args.model))
    trie = LabelTrie.build(label_token_ids(tokenizer, labels))
    rows = [
        row for i in range(0, len(convs), 4) for row in label_token_logprobs(model, tokenizer, convs[i : i + 4], labels)
    ]
    inner = len(trie.inner_nodes())
    result = {
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
        "prompts": f"{validation.relative_to(ROOT) if validation.is_relative_to(ROOT) else validation} (first {n})",
        "labels": len(labels),
        "inner_nodes": inner,
        "nodes_to_run": {str(eps): [nodes_to_run(row, labels, trie, eps) for row in rows] for eps in BOUNDS},
    }
    result["mean_share_to_run"] = {k: sum(v) / len(v) / inner for k, v in result["nodes_to_run"].items()}
    harness.write("trie_bound", result, args)
    for eps, share in result["mean_share_to_run"].items():
        print(f"eps {eps}: {share:.1%} of {inner} inner nodes still to run (mean over {len(rows)} prompts)")


if __name__ == "__main__":
    main()
