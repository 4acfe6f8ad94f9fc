"""How far an F16 GGUF's teacher-forced log-probabilities sit from the merged model's, when the merged
model runs in fp32 and when it runs in bf16 (as it does on a GPU): what export.f16_logprob_tolerance's
dtype-aware default rests on (pipeline/export/merged.py, DEFAULT_F16_LOGPROB_TOLERANCE).

    .venv/bin/python bench/bench_f16_reference.py          (embedded SmolLM2-135M, CPU; a few minutes: bf16 is slow here)

The gap is parity.logprob_gap, the figure export's F16 check holds to the tolerance: per answer
token, the larger of |llama.cpp's log-prob - transformers'| and how far below llama.cpp's own top
token it falls, maximised over the verification prompts' greedy answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.conversation import user_turn
    from pipeline.export.gguf import export_gguf
    from pipeline.export.parity import forced_references, logprob_gap
    from pipeline.llm.gguf_runtime import GgufModel
    from pipeline.llm.loading import cache_root, load_tokenizer, resolve_model

    folder = Path(resolve_model("embedded:smollm2-135m-instruct"))
    tokenizer = load_tokenizer(str(folder))
    lines = (ROOT / "data" / "prompts.jsonl").read_text().splitlines()[: 1 if args.quick else args.prompts]
    convs = [user_turn(json.loads(line)["prompt"]) for line in lines]
    gaps = {}
    with tempfile.TemporaryDirectory() as tmp:
        f16 = export_gguf(folder, ["f16"], Path(tmp), cache_root())[0].path
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            references = forced_references(model, tokenizer, convs, args.max_new_tokens)
            del model
            gguf = GgufModel(f16, n_ctx=512)
            try:
                per_prompt = [logprob_gap(gguf, r) for r in references]
            finally:
                gguf.close()
            name = str(dtype).removeprefix("torch.")
            gaps[name] = {"max": max(per_prompt), "per_prompt": per_prompt}
            print(f"{name}: F16 gap {max(per_prompt):.3f} nats (per prompt {[round(g, 3) for g in per_prompt]})")
    result = {
        "model": "embedded:smollm2-135m-instruct",
        "prompts": len(convs),
        "max_new_tokens": args.max_new_tokens,
        "f16_gap_nats": gaps,
    }
    harness.write("f16_reference", result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
