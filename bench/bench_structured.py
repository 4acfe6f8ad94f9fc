"""Benchmark the structured-generation libraries that install here: which one constrains decoding
to the extraction demo's JSON Schema at the least cost per token, on a CPU, through transformers.

    .venv/bin/python bench/bench_structured.py [--records 200] [--prompts 8] [--quick]

Candidates: xgrammar, llguidance and outlines-core (each `pip install`s as a wheel and runs on a
CPU). The same three steps per candidate, interleaved, best of `--repeats`:

1. setup: build the vocabulary index for SmolLM2's tokenizer and compile the task's schema;
2. per token, without a model: replay the tokens of `--records` gold records of
   data/extraction_prompts.jsonl (json.dumps, so every candidate accepts the same sequence) through
   a fresh matcher, timing the allowed-token bitmask and the advance by one token;
3. end to end: greedy `generate` of the embedded SmolLM2-135M on `--prompts` demo prompts in one
   batch, unconstrained and under each candidate's logits processor; each answer is checked
   against the schema, and the processor's own time per generated token is reported.

The bitmask is applied to the logits by one shared function (xgrammar's CPU kernel) for every
candidate, so the comparison is of the grammar engines. The pipeline's own processor
(pipeline/llm/structured.py) is the xgrammar arm. Writes bench/results/structured.json.
--quick: 20 records, 2 prompts, 48 new tokens, one repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"


class XgrammarEngine:
    name = "xgrammar"

    def __init__(self, tokenizer, schema: dict, vocab_size: int):
        from pipeline.llm.structured import compiled_grammar

        compiled_grammar.cache_clear()  # measure the compile, not the pipeline's cache
        self.grammar = compiled_grammar(tokenizer, vocab_size, json.dumps(schema))

    def matcher(self):
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.grammar)

    def fill(self, matcher, bitmask, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        """Advance; True when the answer is complete (EOS accepted)."""
        assert matcher.accept_token(token), token
        return matcher.is_terminated()


class LlguidanceEngine:
    name = "llguidance"

    def __init__(self, tokenizer, schema: dict, vocab_size: int):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        # The separators xgrammar and json.dumps use, so the replayed tokens are valid for every engine.
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
        self.matcher()  # compiles lazily: build one so setup time includes it

    def matcher(self):
        return self.llg.LLMatcher(self.tokenizer, self.grammar)

    def fill(self, matcher, bitmask, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        assert matcher.consume_token(token), matcher.get_error()
        return matcher.is_stopped()


class OutlinesCoreEngine:
    name = "outlines-core"

    def __init__(self, tokenizer, schema: dict, vocab_size: int):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc = outlines_core
        self.eos = tokenizer.eos_token_id
        vocabulary: dict[bytes, list[int]] = {}
        for token, i in tokenizer.get_vocab().items():
            if i != self.eos:
                vocabulary.setdefault(token_bytes(token), []).append(i)
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        self.index = outlines_core.Index(regex, outlines_core.Vocabulary(self.eos, vocabulary))

    def matcher(self):
        return self.oc.Guide(self.index)

    def fill(self, matcher, bitmask, row: int) -> None:
        target = bitmask[row]
        matcher.write_mask_into(target.data_ptr(), target.numel(), target.element_size())

    def accept(self, matcher, token: int) -> bool:
        if token == self.eos:  # the final state allows EOS but has no transition on it
            return True
        matcher.advance(token, return_tokens=False)
        return False


def token_bytes(token: str) -> bytes:
    """A byte-level BPE token's bytes (GPT-2's printable alphabet), else its UTF-8."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    alphabet = {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}
    if all(ch in alphabet for ch in token):
        return bytes(alphabet[ch] for ch in token)
    return token.encode("utf-8")


ENGINES = (XgrammarEngine, LlguidanceEngine, OutlinesCoreEngine)


class EngineProcessor:
    """A transformers logits processor around one engine, timing itself."""

    def __init__(self, engine, vocab_size: int):
        self.engine, self.vocab_size = engine, vocab_size
        self.matchers = None
        self.seconds = 0.0
        self.rows = 0

    def __call__(self, input_ids, scores):
        import torch
        import xgrammar as xgr

        start = time.perf_counter()
        if self.matchers is None:
            self.matchers = [self.engine.matcher() for _ in range(input_ids.shape[0])]
            self.done = [False] * len(self.matchers)
            self.bitmask = torch.full((len(self.matchers), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        else:
            for i, token in enumerate(input_ids[:, -1].tolist()):
                if not self.done[i]:
                    self.done[i] = self.engine.accept(self.matchers[i], token)
        for i, matcher in enumerate(self.matchers):
            if self.done[i]:
                self.bitmask[i] = -1
            else:
                self.engine.fill(matcher, self.bitmask, i)
                self.rows += 1
        xgr.apply_token_bitmask_inplace(scores, self.bitmask)
        self.seconds += time.perf_counter() - start
        return scores


def replay(engine, sequences: list[list[int]], vocab_size: int) -> dict:
    """Mask and advance, token by token, over known-valid sequences."""
    import torch

    bitmask = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    fill_s = accept_s = 0.0
    tokens = 0
    for sequence in sequences:
        matcher = engine.matcher()
        for token in sequence:
            t0 = time.perf_counter()
            engine.fill(matcher, bitmask, 0)
            t1 = time.perf_counter()
            if not (int(bitmask[0, token // 32]) >> (token % 32)) & 1:
                raise AssertionError(f"{engine.name} masks out token {token} of a valid record")
            engine.accept(matcher, token)
            accept_s += time.perf_counter() - t1
            fill_s += t1 - t0
            tokens += 1
    return {
        "tokens": tokens,
        "mask_us_per_token": 1e6 * fill_s / tokens,
        "advance_us_per_token": 1e6 * accept_s / tokens,
        "us_per_token": 1e6 * (fill_s + accept_s) / tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=None, help="gold records replayed; default 200 (quick: 20)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts generated end to end; default 8 (quick: 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (quick: 48)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm, best kept; default 2 (quick: 1)")
    harness.add_arguments(parser)
    args = parser.parse_args()
    args.records = args.records or (20 if args.quick else 200)
    args.prompts = args.prompts or (2 if args.quick else 8)
    args.max_new_tokens = args.max_new_tokens or (48 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import jsonschema
    import torch

    from pipeline.artifacts import read_jsonl
    from pipeline.conversation import user_turn
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.task import load_task

    task = load_task(ROOT / "data" / "extraction_task.yaml")
    rows = read_jsonl(ROOT / "data" / "extraction_prompts.jsonl")
    tokenizer, model = load_tokenizer(MODEL), load_model(MODEL, device_plan()).eval()
    vocab_size = model.config.vocab_size
    sequences = [
        tokenizer(json.dumps(r["gold"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for r in rows[: args.records]
    ]
    # Zero-shot (instructions, then the message): what a base model told the task sees, short enough to run here.
    conversations = [task.teacher_messages(user_turn(r["prompt"]), few_shot=False) for r in rows[: args.prompts]]
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate(processor) -> tuple[float, list[str], int]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **({"logits_processor": [processor]} if processor else {}),
            )
        new = out[:, encoded["input_ids"].shape[1] :]
        lengths = [
            next((i for i, t in enumerate(row) if t == tokenizer.eos_token_id), len(row)) for row in new.tolist()
        ]
        texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new.tolist(), lengths)]
        return time.perf_counter() - start, texts, sum(lengths)

    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), task.output_schema)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    arms: dict[str, dict] = {}
    for _ in range(args.repeats):
        wall, texts, tokens = generate(None)
        free = arms.setdefault("unconstrained", {"generate_s": [], "schema_valid": None})
        free["generate_s"].append(wall)
        free.update(schema_valid=sum(map(valid, texts)), generated_tokens=tokens)
        for cls in ENGINES:
            start = time.perf_counter()
            engine = cls(tokenizer, task.output_schema, vocab_size)
            setup_s = time.perf_counter() - start
            arm = arms.setdefault(cls.name, {"setup_s": [], "replay": [], "generate_s": [], "processor_us_per_row": []})
            arm["setup_s"].append(setup_s)
            arm["replay"].append(replay(engine, sequences, vocab_size))
            processor = EngineProcessor(engine, vocab_size)
            wall, texts, tokens = generate(processor)
            arm["generate_s"].append(wall)
            arm["processor_us_per_row"].append(1e6 * processor.seconds / max(processor.rows, 1))
            arm.update(schema_valid=sum(map(valid, texts)), generated_tokens=tokens, answer_first=texts[0])
    summary = {}
    for name, arm in arms.items():
        best = {"generate_s": min(arm["generate_s"])}
        if name != "unconstrained":
            fastest = min(arm["replay"], key=lambda r: r["us_per_token"])
            best |= {
                "setup_s": min(arm["setup_s"]),
                "us_per_token": fastest["us_per_token"],
                "mask_us_per_token": fastest["mask_us_per_token"],
                "advance_us_per_token": fastest["advance_us_per_token"],
                "processor_us_per_row": min(arm["processor_us_per_row"]),
            }
        best |= {"schema_valid": arm["schema_valid"], "generated_tokens": arm["generated_tokens"]}
        best["generate_ms_per_token"] = 1000 * best["generate_s"] / max(arm["generated_tokens"], 1)
        summary[name] = best
    chosen = min((n for n in summary if n != "unconstrained"), key=lambda n: summary[n]["us_per_token"])
    result = {
        "schema": "data/extraction_task.yaml output_schema (9 fields)",
        "model": MODEL,
        "records_replayed": len(sequences),
        "replayed_tokens": arms[chosen]["replay"][0]["tokens"],
        "prompts": len(conversations),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "arms": summary,
        "runs": arms,
        "lowest_per_token_cost": chosen,
        "command": f"python bench/bench_structured.py --records {args.records} --prompts {args.prompts} "
        f"--max-new-tokens {args.max_new_tokens}",
    }
    harness.write("structured", result, args)
    print(
        json.dumps(
            {
                "lowest_per_token_cost": chosen,
                **{n: {k: round(v, 2) for k, v in a.items() if isinstance(v, float)} for n, a in summary.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
