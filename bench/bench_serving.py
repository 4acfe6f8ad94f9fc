"""Serving speed per exported artifact: first-token latency and generation tokens/s.

    .venv/bin/python bench/bench_serving.py [--export runs/smollm2-135m-cpu/export] [--prompts 16] [--quick]

Every artifact the export stage wrote: the merged folder in transformers (batch 1 and batched)
and each GGUF in llama.cpp through llama-cpp-python (batch 1; its Python API decodes one
sequence at a time, so batched GGUF serving is not measured here). The same demo prompts as
the student sees them (user message only), greedy. First-token latency = the time to the first
generated token (prompt processing + one step), median over prompts; tokens/s = `--tokens`
generated tokens per prompt, EOS ignored so every arm generates the same number, over the
generation wall time. Without an export (a fresh clone, or --quick) the embedded SmolLM2-135M
stands in: its safetensors conversion as "merged" and its shipped Q4_1 GGUF.
Writes bench/results/serving.json (bench/harness.py: envelope and figures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"


def artifacts(export: Path) -> tuple[str, list[tuple[str, Path]], str]:
    """(merged folder, [(gguf name, path)], where they came from)."""
    from pipeline.llm.loading import embedded_gguf, resolve_model

    merged = export / "merged"
    if (merged / "config.json").is_file():
        ggufs = sorted((export / "gguf").glob("*.gguf")) if (export / "gguf").is_dir() else []
        return str(merged), [(p.stem, p) for p in ggufs], f"export {export}"
    return (
        resolve_model(MODEL),
        [("embedded-q4_1", embedded_gguf("smollm2-135m-instruct"))],
        f"no export at {export}: the embedded {MODEL}",
    )


def hf_arm(model_dir: str, conversations: list[list[dict]], tokens: int, batch: int) -> dict:
    import torch

    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, device_plan()).eval()
    tokenizer.padding_side = "left"

    def encode(convs):
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate(enc, n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **enc,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        return time.perf_counter() - start

    generate(encode(conversations[:1]), 2)  # warm-up
    first = [generate(encode([c]), 1) for c in conversations]
    single = sum(generate(encode([c]), tokens) for c in conversations)
    batched = sum(generate(encode(conversations[i : i + batch]), tokens) for i in range(0, len(conversations), batch))
    n = len(conversations) * tokens
    return {
        "first_token_ms_p50": 1000 * statistics.median(first),
        "tokens_per_s_batch1": n / single,
        f"tokens_per_s_batch{batch}": n / batched,
        "batch": batch,
    }


def gguf_arm(path: Path, conversations: list[list[dict]], tokens: int) -> dict:
    from pipeline.llm.gguf_runtime import GgufModel

    model = GgufModel(path, n_ctx=2048)
    try:
        prompts = [model.tokenize(model.render(c) or "") for c in conversations]

        def generate(ids: list[int], n: int) -> tuple[float, float]:
            start, first, count = time.perf_counter(), None, 0
            for _ in model.llm.generate(ids, temp=0.0, top_k=1, reset=True):  # EOS ignored: n tokens each
                count += 1
                first = first if first is not None else time.perf_counter() - start
                if count >= n:
                    break
            return first, time.perf_counter() - start

        generate(prompts[0], 2)  # warm-up
        runs = [generate(ids, tokens) for ids in prompts]
    finally:
        model.close()
    return {
        "first_token_ms_p50": 1000 * statistics.median(f for f, _ in runs),
        "tokens_per_s_batch1": len(prompts) * tokens / sum(w for _, w in runs),
        "load_s": model.load_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--export", type=Path, default=ROOT / "runs" / "smollm2-135m-cpu" / "export")
    parser.add_argument("--prompts", type=int, default=None, help="default 16 (quick: 2)")
    parser.add_argument("--tokens", type=int, default=None, help="generated per prompt; default 32 (quick: 4)")
    parser.add_argument("--batch", type=int, default=8)
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    args.prompts = args.prompts or (2 if args.quick else 16)
    args.tokens = args.tokens or (4 if args.quick else 32)
    if args.quick:
        args.export = Path("/nonexistent")  # quick: always the embedded stand-ins
    sys.path.insert(0, str(ROOT))

    from pipeline.artifacts import read_jsonl
    from pipeline.conversation import user_turn

    rows = read_jsonl(ROOT / "data" / "prompts.jsonl")[: args.prompts]
    conversations = [user_turn(r["prompt"]) for r in rows]
    merged, ggufs, source = artifacts(args.export)
    result = {
        "source": source,
        "prompts": len(conversations),
        "tokens_per_prompt": args.tokens,
        "arms": {"merged (transformers)": hf_arm(merged, conversations, args.tokens, args.batch)},
    }
    for name, path in ggufs:
        result["arms"][f"{name} (llama.cpp)"] = gguf_arm(path, conversations, args.tokens)
    for arm, figures in result["arms"].items():
        print(f"{arm:>28}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items() if k != "batch"), flush=True)
    harness.write("serving", result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
