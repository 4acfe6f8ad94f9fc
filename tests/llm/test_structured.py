"""Structured decoding under a JSON Schema (xgrammar) and per-field confidence: a random-weight
model's answers are schema-valid because of the constraint and not otherwise; the field
log-probabilities are the value tokens' own; llama.cpp decodes under the schema's GBNF."""

import json
import math
from pathlib import Path

import jsonschema
import pytest

from pipeline.conversation import user_turn
from pipeline.llm.generate import generate_batch
from pipeline.llm.loading import device_plan, load_model, load_tokenizer
from pipeline.llm.structured import decoded_pieces, field_logprobs, gbnf, value_spans, weakest_field
from pipeline.task import load_task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def task():
    return load_task(ROOT / "data" / "extraction_task.yaml")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data" / "extraction_prompts.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows[:100]]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device_plan()).eval(), load_tokenizer(str(tiny_llama_dir))


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_value_spans_and_field_logprobs_on_hand_made_pieces():
    text = '{"a": "xy", "b": [1, 2], "c": null}'
    spans = value_spans(text)
    assert {k: text[s:e] for k, (s, e) in spans.items()} == {"a": '"xy"', "b": "[1, 2]", "c": "null"}
    pieces = [
        '{"',
        "a",
        '":',
        ' "',
        "x",
        "y",
        '",',
        ' "b',
        '":',
        " [",
        "1",
        ",",
        " ",
        "2",
        "]",
        ",",
        ' "c',
        '":',
        " null",
        "}",
    ]
    logprobs = [-0.0] * len(pieces)
    logprobs[pieces.index("x")], logprobs[pieces.index("y")] = -0.5, -0.25
    logprobs[pieces.index(" null")] = -2.0
    logprobs[pieces.index('",')] = -0.125  # the closing quote shares a token with the comma: it counts for `a`
    found = field_logprobs(pieces, logprobs)
    assert found == {"a": pytest.approx(-0.875), "b": 0.0, "c": -2.0}
    assert value_spans('{"a": 1') is None and value_spans("[1]") is None and value_spans('{"a": 1} x') is None
    assert field_logprobs(pieces[:-1], logprobs[:-1]) is None  # not a whole object
    assert weakest_field(found) == ("c", pytest.approx(math.exp(-2.0)))
    assert weakest_field(found, {"c": 4.0, "*": 1.0}) == ("a", pytest.approx(math.exp(-0.875)))
    assert weakest_field(found, fields=("a", "b")) == ("a", pytest.approx(math.exp(-0.875)))


def test_decoded_pieces_concatenate_to_the_decoded_answer(tiny):
    _, tok = tiny
    for text in ['{"name": "Zoë Łukasz", "amount": 12.5}', "plain words ü 😀 end"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = decoded_pieces(tok, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_random_model_is_schema_valid_on_100_prompts_only_when_constrained(tiny, task, prompts):
    model, tok = tiny
    convs = [[{"role": "user", "content": p}] for p in prompts]
    assert len(convs) == 100
    guided = []
    for i in range(0, 100, 25):
        guided += generate_batch(model, tok, convs[i : i + 25], 400, schema=task.output_schema)
    bad = [c.text for c in guided if not (valid(c.text, task.output_schema) and c.stopped)]
    assert not bad, f"{len(bad)} constrained answers are not schema-valid, e.g. {bad[0]!r}"
    # Every answer carries one log-probability per field, each the sum over that value's tokens.
    names = list(task.output_schema["properties"])
    assert all(list(c.field_logprobs) == names for c in guided)
    first = guided[0]
    spans = value_spans(first.text)
    pieces = decoded_pieces(tok, first.token_ids)
    offset = len("".join(pieces)) - len("".join(pieces).lstrip())
    at, expected = 0, dict.fromkeys(names, 0.0)
    for piece, lp in zip(pieces, first.token_logprobs):
        for name, (s, e) in spans.items():
            if at - offset < e and at - offset + len(piece) > s:
                expected[name] += lp
        at += len(piece)
    assert first.field_logprobs == pytest.approx(expected)
    free = generate_batch(model, tok, convs[:25], 120)
    assert sum(valid(c.text, task.output_schema) for c in free) == 0


def test_llama_cpp_decodes_under_the_schema_grammar(task):
    """The embedded GGUF in llama.cpp, under llama-cpp-python's GBNF of the demo schema: JSON with
    every key, in the schema's order, and one log-probability per field."""
    from pipeline.llm.gguf_runtime import GgufModel
    from pipeline.llm.loading import embedded_gguf

    grammar = gbnf(task.output_schema)
    assert 'root ::= "{" space order-id-kv' in grammar
    model = GgufModel(embedded_gguf("smollm2-135m-instruct"), n_ctx=1024)
    try:
        conv = task.teacher_messages(
            user_turn("Please cancel the desk lamp. Order ORD-123456. Thanks, Ana Silva"), few_shot=False
        )
        answer = model.answer(model.tokenize(model.render(conv)), 160, grammar)
    finally:
        model.close()
    assert answer.stopped, answer.text
    assert list(json.loads(answer.text)) == list(task.output_schema["properties"])
    assert list(answer.field_logprobs) == list(task.output_schema["properties"])
