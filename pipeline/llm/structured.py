"""Structured decoding: answers valid against a JSON Schema by construction, and how sure the
model was of each field.

    .venv/bin/pytest -q tests/llm/test_structured.py
    .venv/bin/python bench/bench_structured.py          (why xgrammar: bench/results/structured.json)

An extraction task's local teacher and its student decode under the task's `output_schema`
(`generate_batch(schema=...)`): at every step the tokens that cannot continue a valid answer are
masked out, so a 135M model's answer parses and validates whatever its weights (tested with a
random one). The grammar library is xgrammar: of the three that install here and work with
transformers' logits processors on a CPU (xgrammar, llguidance, outlines-core), it had the
smallest per-token cost and the fastest compile on the demo schema (bench/bench_structured.py).
llama.cpp serves a GGUF with its own grammar engine (`gbnf`), converted from the same schema.

The answer's confidence is read per field: the log-probability of the tokens that spell a
top-level field's value (`field_logprobs`), under the constrained distribution, so tokens the
grammar forces (braces, keys, quotes) count for nothing and what the model chose counts in full.
The router's `field_prob` signal takes the weakest field (pipeline/llm/policy.py).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any


class SchemaLogitsProcessor:
    """A transformers logits processor (pass it in `generate(logits_processor=[...])`, one per
    call) that keeps every row of the batch inside the JSON Schema and ends it with EOS once the
    object is complete. Rows that have finished are left alone (their tokens are padding)."""

    def __init__(self, tokenizer, schema: dict[str, Any]):
        self._tokenizer = tokenizer
        self._schema = json.dumps(schema)  # property order is the answer's key order
        self._matchers: list | None = None
        self._bitmask = None

    def __call__(self, input_ids, scores):
        import xgrammar as xgr

        if self._matchers is None:  # first step: nothing generated yet; the grammar starts fresh
            grammar = compiled_grammar(self._tokenizer, scores.shape[-1], self._schema)
            self._matchers = [xgr.GrammarMatcher(grammar) for _ in range(input_ids.shape[0])]
            self._bitmask = xgr.allocate_token_bitmask(len(self._matchers), scores.shape[-1])
        else:
            for matcher, token in zip(self._matchers, input_ids[:, -1].tolist()):
                if not matcher.is_terminated() and not matcher.accept_token(token):
                    raise RuntimeError(f"token {token} was generated outside the JSON Schema's mask")
        for i, matcher in enumerate(self._matchers):
            if matcher.is_terminated():
                self._bitmask[i] = -1  # every bit set: nothing masked
            else:
                matcher.fill_next_token_bitmask(self._bitmask, i)
        xgr.apply_token_bitmask_inplace(scores, self._bitmask.to(scores.device))
        return scores


@functools.lru_cache(maxsize=8)
def compiled_grammar(tokenizer, vocab_size: int, schema_json: str):
    """The schema compiled for this tokenizer's vocabulary (once per tokenizer and schema).
    `vocab_size` is the logits' width, which may exceed the tokenizer's (padded embeddings).
    Compact separators (", " and ": ", no newlines): the shape json.dumps writes and the task's
    worked examples show, so the teacher's answers and the student's training data agree."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_token_id])
    return xgr.GrammarCompiler(info).compile_json_schema(schema_json, any_whitespace=False)


def gbnf(schema: dict[str, Any]) -> str:
    """The schema as a llama.cpp grammar (GBNF), by llama-cpp-python's own converter: what
    llama.cpp's server does with a `response_format` schema. It keeps types, enums, required keys
    and array lengths but drops a `pattern` or `maxLength` on a nullable string, so a GGUF can
    answer JSON that parses and still fails the schema (export's parity table counts it)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(schema))


# ---------------------------------------------------------------- per-field confidence


def value_spans(text: str) -> dict[str, tuple[int, int]] | None:
    """Each top-level field of a JSON object answer -> the [start, end) characters of its value;
    None when the answer is not one JSON object."""
    decoder = json.JSONDecoder()
    i = _skip_space(text, 0)
    if not text.startswith("{", i):
        return None
    spans: dict[str, tuple[int, int]] = {}
    i = _skip_space(text, i + 1)
    try:
        while not text.startswith("}", i):
            key, i = decoder.raw_decode(text, i)
            i = _skip_space(text, i)
            if not isinstance(key, str) or not text.startswith(":", i):
                return None
            start = _skip_space(text, i + 1)
            _, end = decoder.raw_decode(text, start)
            spans[key] = (start, end)
            i = _skip_space(text, end)
            if text.startswith(",", i):
                i = _skip_space(text, i + 1)
            elif not text.startswith("}", i):
                return None
    except ValueError:
        return None
    return spans if not text[_skip_space(text, i + 1) :].strip() else None


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def field_logprobs(pieces: list[str], logprobs: list[float]) -> dict[str, float] | None:
    """Each top-level field -> the summed log-probability of the answer tokens that overlap its
    value (log P(this value | the fields before it)). `pieces` are the answer's tokens as text,
    in order (their concatenation is the answer); None when the answer is not a JSON object or
    the pieces and log-probabilities do not line up."""
    if len(pieces) != len(logprobs):
        return None
    text = "".join(pieces)
    spans = value_spans(text)
    if spans is None:
        return None
    bounds, at = [], 0
    for piece in pieces:
        bounds.append((at, at + len(piece)))
        at += len(piece)
    out = {}
    for name, (start, end) in spans.items():
        values = [lp for (a, b), lp in zip(bounds, logprobs) if a < end and b > start and math.isfinite(lp)]
        out[name] = float(sum(values))
    return out


def decoded_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded answer, by incremental decoding (byte-level
    and SentencePiece vocabularies alike); the pieces concatenate to the decoded text. A character
    split over tokens (a partial UTF-8 sequence decodes as U+FFFD until it is complete) belongs
    to the token that completes it."""
    import os

    pieces: list[str] = []
    before = ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        keep = len(os.path.commonprefix([before, text]))
        excess = len(before) - keep
        for j in range(len(pieces) - 1, -1, -1):  # take back what earlier pieces claimed past `keep`
            if excess <= 0:
                break
            cut = min(excess, len(pieces[j]))
            pieces[j] = pieces[j][: len(pieces[j]) - cut]
            excess -= cut
        pieces.append(text[keep:])
        before = text
    return pieces


def weakest_field(
    field_lp: dict[str, float] | None,
    temperatures: dict[str, float] | None = None,
    fields: tuple[str, ...] | None = None,
) -> tuple[str, float] | None:
    """(the field with the lowest calibrated probability, that probability) among `fields`
    (all when None); p = exp(logprob / T_field), T from `fit_field_temperatures` (1 when unfitted)."""
    if not field_lp:
        return None
    temperatures = temperatures or {}
    chosen = [f for f in (fields or field_lp) if f in field_lp]
    if not chosen:
        return None
    probs = {f: math.exp(field_lp[f] / temperatures.get(f, temperatures.get("*", 1.0))) for f in chosen}
    name = min(chosen, key=lambda f: (probs[f], chosen.index(f)))
    return name, probs[name]
