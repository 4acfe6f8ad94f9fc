"""Benchmark serving a 77-label student by label posterior: requests/s at 4 concurrent clients,
trie scoring against the per-label-bucket method it replaced.

    .venv/bin/python bench/bench_label_serving.py [--requests 12] [--clients 4] [--quick]

The router's student backend (pipeline.router.backends.StudentBackend, `decode=label_posterior`,
micro-batches up to --clients) answers Banking77 queries (the first --requests rows of
/work/shared/data/banking77/train.csv's text column, one per intent; without that file, the demo's
prompts) from Banking77's 77 intents. Each of --clients asyncio clients sends its share of the
requests one after another, so the backend forms batches from whoever is waiting, as it does
behind the HTTP layer (HTTP itself is not in the timing: bench_router.py measures that layer).

There is no trained Banking77 student here: the embedded SmolLM2-135M (fp32) with Banking77's
recipe template stands in. The work per request is the same for any 135M student with these
labels, so it measures speed, not accuracy.

    trie      the backend as shipped (pipeline.llm.scoring over the label trie)
    bucketed  the same backend with label scoring swapped for the per-label-bucket method
              (bench_label_scoring.bucketed_label_token_logprobs, kept in the bench only)

Interleaved, best of --repeats; answers and confidences compared between the arms. Beside them,
the compute ceiling: this CPU's fp32 matmul rate (bench_finetune.matmul_gflops) over the floating-
point work of one exact scoring per request (every linear layer over the prompt and the trie's inner
nodes, the LM head at each inner node and the prompt's last position, attention over the keys each
query sees), the most requests/s any exact scorer of these labels could serve here.
Writes bench/results/label_serving.json (bench/harness.py: envelope and figures).
--quick: 4 requests, 2 clients, once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402
from bench_finetune import matmul_gflops  # noqa: E402
from bench_label_scoring import (  # noqa: E402
    BANKING77_CSV,
    MODEL,
    TEMPLATE,
    banking77_prompts,
    bucketed_label_token_logprobs,
    gflop_per_request,
)


async def serve(backend, conversations: list[list[dict]], clients: int) -> tuple[float, list]:
    """Wall seconds for `clients` clients to get every conversation answered, and the answers in order."""
    answers: list = [None] * len(conversations)

    async def client(start: int) -> None:
        for i in range(start, len(conversations), clients):
            answers[i] = await backend.complete(conversations[i], max_tokens=32)

    began = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - began, answers


def run_arm(backend, conversations, clients: int, bucketed: bool) -> tuple[float, list, list[int]]:
    import pipeline.llm.generate as generate

    shipped = generate.label_token_logprobs  # what decode=label_posterior scores with
    generate.label_token_logprobs = bucketed_label_token_logprobs if bucketed else shipped
    first_batch = len(backend.batches)
    try:
        wall, answers = asyncio.run(serve(backend, conversations, clients))
    finally:
        generate.label_token_logprobs = shipped
    return wall, answers, backend.batches[first_batch:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=None, help="Banking77 queries per arm; default 12 (quick: 4)")
    parser.add_argument(
        "--clients", type=int, default=None, help="concurrent clients = max_batch; default 4 (quick: 2)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm, interleaved, best kept; default 1")
    parser.add_argument("--data", type=Path, default=BANKING77_CSV, help="Banking77's train.csv (text,category)")
    harness.add_arguments(parser)
    args = parser.parse_args()
    args.requests = args.requests or (4 if args.quick else 12)
    args.clients = args.clients or (2 if args.quick else 4)
    args.repeats = args.repeats or 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import yaml

    from pipeline.artifacts import read_jsonl
    from pipeline.conversation import user_turn
    from pipeline.llm.loading import load_tokenizer
    from pipeline.llm.policy import label_posterior
    from pipeline.router.backends import StudentBackend

    labels = yaml.safe_load((ROOT / "data" / "banking77_task.yaml").read_text())["labels"]
    if args.data.is_file():
        prompts, source = banking77_prompts(args.data, args.requests), f"{args.data} (text column, one per intent)"
    else:
        prompts = [r["prompt"] for r in read_jsonl(ROOT / "data" / "prompts.jsonl")[: args.requests]]
        source = f"data/prompts.jsonl ({args.data} not found)"
    convs = [user_turn(p) for p in prompts]
    backend = StudentBackend(Path(MODEL), score_labels=labels, max_batch=args.clients, decode="label_posterior")
    backend.tokenizer = load_tokenizer(MODEL, chat_template=TEMPLATE)  # Banking77's recipe template
    for bucketed in (False, True):  # untimed: the first call of each shape pays the allocator's warm-up
        run_arm(backend, convs[: args.clients], args.clients, bucketed)

    walls = {"trie": [], "bucketed": []}
    answers, batches = {}, {}
    for _ in range(args.repeats):
        for arm in walls:
            wall, answers[arm], batches[arm] = run_arm(backend, convs, args.clients, arm == "bucketed")
            walls[arm].append(wall)
    rps = {arm: len(convs) / min(w) for arm, w in walls.items()}
    confidence = {arm: [max(label_posterior(c)[1].values()) for c in answers[arm]] for arm in walls}
    work = gflop_per_request(backend.model, backend.tokenizer, [c.prompt_tokens for c in answers["trie"]], labels)
    rate = matmul_gflops()
    result = {
        "model": MODEL,
        "labels": len(labels),
        "prompt_source": source,
        "chat_template": str(TEMPLATE.relative_to(ROOT)),
        "requests": len(convs),
        "clients": args.clients,
        "wall_s": walls,
        "requests_per_s": rps,
        "batch_sizes": batches,
        "trie_speedup_over_bucketed": rps["trie"] / rps["bucketed"],
        "compute": {
            "gflop_per_request": work,
            "fp32_matmul_gflops": rate,
            "ceiling_requests_per_s": rate / work,
            "trie_share_of_ceiling": rps["trie"] * work / rate,
        },
        "identical_answers": sum(t.text == b.text for t, b in zip(answers["trie"], answers["bucketed"])),
        "max_confidence_difference": max(abs(t - b) for t, b in zip(confidence["trie"], confidence["bucketed"])),
        "command": f"python bench/bench_label_serving.py --requests {args.requests} --clients {args.clients} "
        f"--repeats {args.repeats}" + (" --quick" if args.quick else ""),
    }
    harness.write("label_serving", result, args)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "requests_per_s",
                    "trie_speedup_over_bucketed",
                    "compute",
                    "identical_answers",
                    "max_confidence_difference",
                    "batch_sizes",
                )
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
