"""The shared-prefix KV cache gives the answers plain batched generation gives (the local
teacher's speed-up must not change a label): `.venv/bin/pytest -q tests/llm/test_generate_prefix.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.llm.encoding import MIN_SHARED_PREFIX, PrefixCache, common_prefix_length
from pipeline.llm.generate import generate_batch

ROOT = Path(__file__).resolve().parents[2]


def test_common_prefix_leaves_every_row_a_token_of_its_own():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the short row keeps its last token
    assert common_prefix_length([[9, 2], [1, 2]]) == 0


@pytest.fixture(scope="module")
def teacher(embedded_dir):
    from pipeline.artifacts import read_jsonl
    from pipeline.conversation import user_turn
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.task import load_task

    task = load_task(ROOT / "data" / "task.yaml")
    prompts = [r["prompt"] for r in read_jsonl(ROOT / "data" / "prompts.jsonl")[:8]]
    model = load_model(str(embedded_dir), device_plan()).eval()
    return model, load_tokenizer(str(embedded_dir)), task, [task.teacher_messages(user_turn(p)) for p in prompts]


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


def test_label_scores_with_the_prefix_cache_equal_plain_ones(teacher):
    """teacher.label_distribution scores every label after the teacher's long prompt: with the prefix
    cache each label's log-likelihood is the plain pass's (and the cache is reused, not rebuilt)."""
    from pipeline.llm.scoring import label_token_logprobs

    model, tokenizer, task, conversations = teacher
    cache = PrefixCache()
    plain = label_token_logprobs(model, tokenizer, conversations[:3], task.labels)
    cached = label_token_logprobs(model, tokenizer, conversations[:3], task.labels, cache)
    again = label_token_logprobs(model, tokenizer, conversations[3:5], task.labels, cache)
    for a, b in zip(plain, cached):
        assert set(a) == set(b) == set(task.labels)
        for label in task.labels:
            assert b[label] == pytest.approx(a[label], abs=2e-4)
    alone = label_token_logprobs(model, tokenizer, conversations[4:5], task.labels)[0]
    for label in task.labels:  # a second batch, on the kept prefix
        assert again[1][label] == pytest.approx(alone[label], abs=2e-4)
    assert cache.hits == 1 and len(cache.ids) >= MIN_SHARED_PREFIX


def test_label_scores_after_generation_reuse_its_cache_and_equal_a_scoring_pass(teacher):
    """teacher.label_distribution: generate with the prefix cache, then score every label from
    generate's own KV cache: the scores are a separate plain scoring pass's, and the only extra
    forward runs the label trie's inner nodes (the prompts are not run again)."""
    from pipeline.llm.label_trie import LabelTrie
    from pipeline.llm.scoring import label_logprobs, label_token_ids

    model, tokenizer, task, conversations = teacher
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    try:
        scored = generate_batch(
            model, tokenizer, conversations[:3], 6, task.labels, score_labels=task.labels, prefix_cache=PrefixCache()
        )
    finally:
        hook.remove()
    inner = len(LabelTrie.build(label_token_ids(tokenizer, task.labels)).inner_nodes())
    prefix, tails, *steps, trie = widths  # the prefix once, the prompts' own tails, one token a step
    assert set(steps) <= {1} and trie == inner and prefix >= MIN_SHARED_PREFIX
    for c, plain in zip(scored, label_logprobs(model, tokenizer, conversations[:3], task.labels)):
        assert set(c.label_logprobs) == set(task.labels)
        for label in task.labels:
            assert c.label_logprobs[label] == pytest.approx(plain[label], abs=2e-4)
