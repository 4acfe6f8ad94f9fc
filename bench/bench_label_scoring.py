"""Benchmark label scoring (every label's teacher-forced log-likelihood after a prompt) over the
label trie against the per-label-bucket method it replaced, the floor and greedy generation.

    .venv/bin/python bench/bench_label_scoring.py [--prompts 16] [--repeats 2] [--quick]

The embedded SmolLM2-135M (fp32) with Banking77's recipe template (recipes/templates/chatml.jinja:
the user message alone) scores Banking77's 77 intents (data/banking77_task.yaml) after Banking77
queries: the first --prompts rows of /work/shared/data/banking77/train.csv's text column, one per
intent in file order (`--data`; without that file, the demo's prompts, data/prompts.jsonl, and the
JSON says which). Per batch size (1 and 16), interleaved, best of --repeats, seconds per request:

    bucketed  the method the trie replaced (kept here only, as the baseline): the prompt run once,
              its KV cache copied for every label, labels batched by token length
    trie      pipeline.llm.scoring.label_token_logprobs (one pass over prompts + trie nodes)
    floor     one plain causal forward over the prompts + the trie's inner nodes, logits included
    greedy    greedy generation of an answer as long as the longest label (18 tokens), unconstrained

and the largest |trie - bucketed| log-prob seen (the capture side: bench_label_capture.py).
Writes bench/results/label_scoring.json (bench/harness.py: envelope and figures; wall seconds,
best of the repeats, each run's CPU seconds beside them).
--quick: 2 prompts at batch sizes 1 and 2, once each.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
BANKING77_CSV = Path("/work/shared/data/banking77/train.csv")
TEMPLATE = ROOT / "recipes" / "templates" / "chatml.jinja"


# ---------------------------------------------------------------- the baseline: per-label buckets


def bucketed_label_token_logprobs(model, tokenizer, conversations, labels, prefix_cache=None):
    """The method the trie replaced, verbatim but for the encoding helpers' public names."""
    import torch

    from pipeline.llm.encoding import cache_kwarg, encode_prompts
    from pipeline.llm.scoring import label_token_ids

    enc = encode_prompts(model, tokenizer, conversations, prefix_cache)
    n_prompts = len(conversations)
    seqs = label_token_ids(tokenizer, labels)
    prompt_mask = enc["attention_mask"]
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cached = enc.get(cache_kwarg(model))
    shared = cached.get_seq_length() if cached is not None else 0
    per_label = [{} for _ in range(n_prompts)]
    with torch.inference_mode():
        first = model(
            input_ids=enc["input_ids"][:, shared:],
            attention_mask=prompt_mask,
            position_ids=prompt_pos[:, shared:],
            use_cache=True,
            **({cache_kwarg(model): cached} if cached is not None else {}),
        )
        cache_name = "cache" if "cache" in first else "past_key_values"
        next_logprobs = first.logits[:, -1, :].float().log_softmax(-1)
        groups = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(len(seq), []).append(i)
        buckets = sorted(groups.items())
        for n, (length, members) in enumerate(buckets):
            cache = first[cache_name] if n == len(buckets) - 1 else copy.deepcopy(first[cache_name])
            cache.batch_repeat_interleave(len(members))
            ids = torch.tensor([seqs[j] for j in members], device=model.device).repeat(n_prompts, 1)
            lengths = prompt_mask.sum(-1).repeat_interleave(len(members))
            positions = lengths[:, None] + torch.arange(length, device=model.device)[None, :]
            full_mask = torch.cat([prompt_mask.repeat_interleave(len(members), dim=0), torch.ones_like(ids)], dim=1)
            out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, **{cache_name: cache})
            first_lp = next_logprobs.repeat_interleave(len(members), dim=0).gather(-1, ids[:, :1]).squeeze(-1)
            rest_lp = out.logits[:, :-1, :].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            token_lp = torch.cat([first_lp[:, None], rest_lp], dim=1).view(n_prompts, len(members), length)
            for i, row in enumerate(token_lp.tolist()):
                per_label[i].update(zip(members, row))
    return [{label: row[j] for j, label in enumerate(labels)} for row in per_label]


# ---------------------------------------------------------------- the other arms


def floor_pass(model, tokenizer, conversations, labels) -> None:
    """One causal forward over each prompt followed by the trie's inner nodes: the same tokens and
    logits the trie scores, with no tree mask and no pass split."""
    import torch

    from pipeline.llm.encoding import encode_prompts
    from pipeline.llm.label_trie import LabelTrie
    from pipeline.llm.scoring import label_token_ids

    enc = encode_prompts(model, tokenizer, conversations, None)
    trie = LabelTrie.build(label_token_ids(tokenizer, labels))
    inner = torch.tensor([[trie.tokens[n] for n in trie.inner_nodes()]]).expand(len(conversations), -1)
    ids = torch.cat([enc["input_ids"], inner], dim=1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(inner)], dim=1)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, logits_to_keep=inner.shape[1] + 1).logits.float().logsumexp(-1)


def gflop_per_request(model, tokenizer, prompt_tokens: list[int], labels: list[str]) -> float:
    """Mean GFLOP (2 per multiply-add) of scoring every label exactly after each prompt: every
    linear layer (but LoRA's: a merged adapter adds none) over the prompt and the trie's inner nodes, the LM head at each
    inner node and the prompt's last position, attention over the keys each query sees. This CPU's
    matmul rate over it is the fastest any exact scorer could go."""
    import torch

    from pipeline.llm.label_trie import LabelTrie
    from pipeline.llm.scoring import label_token_ids

    trie = LabelTrie.build(label_token_ids(tokenizer, labels))
    inner = trie.inner_nodes()
    config, head = model.config, model.get_output_embeddings()
    body = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_key = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim  # q.k and p.v

    def flops(prompt: int) -> float:
        keys = prompt * (prompt + 1) / 2 + sum(prompt + trie.depths[n] + 1 for n in inner)
        return 2 * body * (prompt + len(inner)) + 2 * head.weight.numel() * (len(inner) + 1) + per_key * keys

    return sum(flops(p) for p in prompt_tokens) / len(prompt_tokens) / 1e9


def timed(fn) -> tuple[float, float, object]:
    """Wall seconds, this process's CPU seconds (steadier on a machine other jobs share), the result."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def banking77_prompts(path: Path, n: int) -> list[str]:
    """One query per intent, in the file's order of intents, until n."""
    seen, prompts = set(), []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] not in seen:
                seen.add(row["category"])
                prompts.append(row["text"])
            if len(prompts) == n:
                break
    return prompts


def max_difference(a: list[dict], b: list[dict]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for label in ra for x, y in zip(ra[label], rb[label]))


# ---------------------------------------------------------------- measurements


def scoring_arms(model, tokenizer, prompts: list[str], labels: list[str], batch: int, repeats: int) -> dict:
    from pipeline.conversation import user_turn
    from pipeline.llm.generate import generate_batch
    from pipeline.llm.scoring import label_token_ids, label_token_logprobs

    convs = [user_turn(p) for p in prompts]
    batches = [convs[i : i + batch] for i in range(0, len(convs), batch)]
    longest = max(len(seq) for seq in label_token_ids(tokenizer, labels))
    arms = {
        "bucketed": lambda b: bucketed_label_token_logprobs(model, tokenizer, b, labels),
        "trie": lambda b: label_token_logprobs(model, tokenizer, b, labels),
        "floor": lambda b: floor_pass(model, tokenizer, b, labels),
        "greedy": lambda b: generate_batch(model, tokenizer, b, longest),
    }
    for fn in arms.values():  # untimed: the first call of each shape pays the allocator's and kernels' warm-up
        fn(convs[:1])
    walls = {arm: [] for arm in arms}
    cpus = {arm: [] for arm in arms}
    outputs = {}
    for _ in range(repeats):
        for arm, fn in arms.items():
            wall, cpu, outputs[arm] = timed(lambda fn=fn: [out for b in batches for out in (fn(b) or [])])
            walls[arm].append(wall)
            cpus[arm].append(cpu)
    per_request = {arm: min(w) / len(convs) for arm, w in walls.items()}
    agree = sum(
        max(t, key=lambda k: sum(t[k])) == max(o, key=lambda k: sum(o[k]))
        for t, o in zip(outputs["trie"], outputs["bucketed"])
    )
    return {
        "batch": batch,
        "prompts": len(convs),
        "wall_s": walls,
        "cpu_s": cpus,
        "s_per_request": per_request,
        "trie_speedup_over_bucketed": per_request["bucketed"] / per_request["trie"],
        "trie_over_floor": per_request["trie"] / per_request["floor"],
        "trie_over_greedy": per_request["trie"] / per_request["greedy"],
        "greedy_tokens": longest,
        "greedy_mean_answer_tokens": sum(c.completion_tokens for c in outputs["greedy"]) / len(convs),
        "max_abs_logprob_difference": max_difference(outputs["trie"], outputs["bucketed"]),
        "same_top_label": agree,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--prompts", type=int, default=None, help="Banking77 queries per batch size; default 16 (quick: 2)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per arm, interleaved, best kept; default 2 (quick: 1)"
    )
    parser.add_argument("--data", type=Path, default=BANKING77_CSV, help="Banking77's train.csv (text,category)")
    harness.add_arguments(parser)
    args = parser.parse_args()
    args.prompts = args.prompts or (2 if args.quick else 16)
    args.repeats = args.repeats or (1 if args.quick else 2)
    batches = (1, 2) if args.quick else (1, 16)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import yaml

    from pipeline.artifacts import read_jsonl
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    labels = yaml.safe_load((ROOT / "data" / "banking77_task.yaml").read_text())["labels"]
    if args.data.is_file():
        prompts, source = banking77_prompts(args.data, args.prompts), f"{args.data} (text column, one per intent)"
    else:
        prompts = [r["prompt"] for r in read_jsonl(ROOT / "data" / "prompts.jsonl")[: args.prompts]]
        source = f"data/prompts.jsonl ({args.data} not found)"
    model = load_model(MODEL, device_plan()).eval()
    student = load_tokenizer(MODEL, chat_template=TEMPLATE)
    scoring = {str(b): scoring_arms(model, student, prompts, labels, b, args.repeats) for b in batches}
    result = {
        "model": MODEL,
        "labels": len(labels),
        "prompt_source": source,
        "chat_template": str(TEMPLATE.relative_to(ROOT)),
        "scoring": scoring,
        "command": f"python bench/bench_label_scoring.py --prompts {args.prompts} --repeats {args.repeats}"
        + (" --quick" if args.quick else ""),
    }
    harness.write("label_scoring", result, args)
    print(
        json.dumps(
            {
                b: {
                    k: s[k]
                    for k in (
                        "s_per_request",
                        "trie_speedup_over_bucketed",
                        "trie_over_floor",
                        "trie_over_greedy",
                        "max_abs_logprob_difference",
                    )
                }
                for b, s in scoring.items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
