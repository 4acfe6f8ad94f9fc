"""The shared-prefix KV cache gives the answers plain batched generation gives (the local
teacher's speed-up must not change a label): `.venv/bin/pytest -q tests/test_generate_prefix.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.llm.generate import MIN_SHARED_PREFIX, PrefixCache, common_prefix_length, generate_batch

ROOT = Path(__file__).resolve().parents[1]


def test_common_prefix_leaves_every_row_a_token_of_its_own():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the short row keeps its last token
    assert common_prefix_length([[9, 2], [1, 2]]) == 0


@pytest.fixture(scope="module")
def teacher(embedded_dir):
    from pipeline.artifacts import read_jsonl
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.task import load_task

    task = load_task(ROOT / "data" / "task.yaml")
    prompts = [r["prompt"] for r in read_jsonl(ROOT / "data" / "prompts.jsonl")[:8]]
    model = load_model(str(embedded_dir), device_plan()).eval()
    return model, load_tokenizer(str(embedded_dir)), task, [task.teacher_messages(p) for p in prompts]


def test_prefix_cached_answers_equal_plain_ones_and_the_cache_is_reused(teacher):
    model, tokenizer, task, conversations = teacher
    cache = PrefixCache()
    plain, cached = [], []
    for i in (0, 4):  # two batches: the second one reuses the first one's prefix
        batch = conversations[i : i + 4]
        plain += generate_batch(model, tokenizer, batch, 6, task.labels)
        cached += generate_batch(model, tokenizer, batch, 6, task.labels, prefix_cache=cache)
    assert [c.text for c in cached] == [c.text for c in plain]
    assert [c.prompt_tokens for c in cached] == [c.prompt_tokens for c in plain]
    for a, b in zip(plain, cached):
        assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-4)
    assert cache.hits == 1 and len(cache.ids) >= MIN_SHARED_PREFIX


def test_unconstrained_answers_also_match(teacher):
    model, tokenizer, _, conversations = teacher
    plain = generate_batch(model, tokenizer, conversations[:3], 5)
    cached = generate_batch(model, tokenizer, conversations[:3], 5, prefix_cache=PrefixCache())
    assert [c.text for c in cached] == [c.text for c in plain]
    assert [c.finish_reason for c in cached] == [c.finish_reason for c in plain]
