"""Label scoring over the label trie (one pass, tree attention mask) equals the brute force, one
full forward per (prompt, label), within 1e-4 per token: Banking77's 77 intents plus labels that
are prefixes of one another, on tiny random Llama / Mistral / Qwen2 models (sdpa and eager) and
the embedded SmolLM2 in fp32, with and without a shared-prefix cache.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/llm/test_trie_scoring.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline.llm.label_trie import LabelTrie

ROOT = Path(__file__).resolve().parents[2]
BANKING77 = yaml.safe_load((ROOT / "data" / "banking77_task.yaml").read_text())["labels"]
# Each a prefix of the next in text and in tokens ("card" is a label and the start of "card_arrival").
NESTED = ["card", "card_", "card_arrival_", "top", "x"]
LABELS = BANKING77 + NESTED
CONVS = [  # of different lengths: the left padding is exercised
    [{"role": "user", "content": "My card still has not arrived, it has been two weeks. What should I do?"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Answer with an intent."}, {"role": "user", "content": "top up fee?"}],
]
INSTRUCTIONS = (
    "You route an online bank's customer queries to one intent. Reply with exactly one intent label "
    "and nothing else. The intents cover cards (arrival, linking, payments, fees), top-ups (by card, "
    "by bank transfer, by cash or cheque, their limits and failures), transfers, exchange rates, "
    "cash withdrawals, identity checks and account details."
)
SHARED = [
    [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": text}]
    for text in ("where is my new card", "why was I charged twice for one coffee?", "exchange rate")
]
TOLERANCE = 1e-4


_ORACLE: dict[tuple, list[float]] = {}  # keyed by the model object itself (an id() can be reused)


def brute_force(model, tokenizer, conv: list[dict], label: str) -> list[float]:
    """One unpadded sequence, prompt + label + EOS, one forward: log p of each label token and the EOS.
    Kept per model, conversation and label: the SmolLM2 tests share one reference."""
    import torch

    key = (model, repr(conv), label)
    if key not in _ORACLE:
        prompt = tokenizer(
            tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False), add_special_tokens=False
        )["input_ids"]
        answer = tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + answer], device=model.device)).logits[0].float()
        logprobs = logits.log_softmax(-1)
        _ORACLE[key] = [logprobs[len(prompt) + i - 1, t].item() for i, t in enumerate(answer)]
    return _ORACLE[key]


def worst_difference(model, tokenizer, convs, labels, scored) -> float:
    worst = 0.0
    for conv, row in zip(convs, scored, strict=True):
        assert list(row) == labels
        for label in labels:
            expected = brute_force(model, tokenizer, conv, label)
            assert len(row[label]) == len(expected)
            worst = max(worst, *(abs(a - b) for a, b in zip(row[label], expected)))
    print(f"max |trie - brute force| over {len(convs)} prompts x {len(labels)} labels: {worst:.2e}")
    return worst


# ---------------------------------------------------------------- the trie


def test_trie_runs_each_shared_prefix_once_and_keeps_every_label_path():
    sequences = [[5, 6, 0], [5, 0], [5, 6, 7, 0], [8, 0], [5, 6, 0]]  # a duplicate, and labels nesting
    trie = LabelTrie.build(sequences)
    assert [[trie.tokens[n] for n in path] for path in trie.paths] == sequences
    assert trie.paths[0] == trie.paths[4]  # the same tokens: the same nodes
    assert len(trie.tokens) == 8  # 5, 5-6, 5-6-0, 5-0, 5-6-7, 5-6-7-0, 8, 8-0
    inner = trie.inner_nodes()
    assert [trie.tokens[n] for n in inner] == [5, 6, 7, 8]  # no EOS leaf is run
    assert all(trie.parents[n] < n for n in range(len(trie.tokens)))
    pairs = set(trie.ancestors_or_self(inner))
    assert pairs == {(0, 0), (1, 1), (1, 0), (2, 2), (2, 1), (2, 0), (3, 3)}


def test_banking77_labels_share_prefixes_in_the_student_tokenization(embedded_dir):
    from pipeline.llm.loading import load_tokenizer
    from pipeline.llm.scoring import label_token_ids

    trie = LabelTrie.build(label_token_ids(load_tokenizer(str(embedded_dir)), BANKING77))
    tokens = sum(len(path) for path in trie.paths)
    assert len(trie.inner_nodes()) < len(trie.tokens) < tokens  # what one pass saves over a pass per label


# ---------------------------------------------------------------- equality with the brute force


def _tiny(kind: str, attention: str, tiny_llama_dir):
    import torch
    from support.tiny_models import tiny_shape
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen2Config

    from pipeline.llm.loading import device_plan, load_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    if kind == "llama":
        return load_model(str(tiny_llama_dir), device_plan(), attn_implementation=attention).eval(), tokenizer
    shape = tiny_shape(tokenizer)
    config = MistralConfig(**shape) if kind == "mistral" else Qwen2Config(**shape)
    torch.manual_seed(1 if kind == "mistral" else 2)  # weights of their own, not the tiny Llama's
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval(), tokenizer


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_trie_scores_equal_brute_force_on_tiny_models(kind, attention, tiny_llama_dir):
    from pipeline.llm.scoring import label_token_logprobs

    model, tokenizer = _tiny(kind, attention, tiny_llama_dir)
    scored = label_token_logprobs(model, tokenizer, CONVS, LABELS)
    assert worst_difference(model, tokenizer, CONVS, LABELS, scored) <= TOLERANCE


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])  # Mistral: a sliding-window cache, cut back
def test_scores_after_generation_equal_brute_force_on_tiny_models(kind, tiny_llama_dir):
    """generate_batch(score_labels=...) scores from generate's own KV cache, cut back to the prompts."""
    from pipeline.llm.generate import generate_batch

    model, tokenizer = _tiny(kind, "sdpa", tiny_llama_dir)
    for conv, completion in zip(CONVS, generate_batch(model, tokenizer, CONVS, 5, score_labels=LABELS), strict=True):
        for label in LABELS:
            expected = brute_force(model, tokenizer, conv, label)
            assert completion.label_logprobs[label] == pytest.approx(sum(expected), abs=TOLERANCE * len(expected))


@pytest.fixture(scope="module")
def smollm2(embedded_dir):
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    return load_model(str(embedded_dir), device_plan()).eval(), load_tokenizer(str(embedded_dir))


def test_trie_scores_equal_brute_force_on_smollm2(smollm2):
    import torch

    from pipeline.llm.scoring import label_logprobs, label_token_logprobs

    model, tokenizer = smollm2
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float32
    scored = label_token_logprobs(model, tokenizer, CONVS[:2], LABELS)
    assert worst_difference(model, tokenizer, CONVS[:2], LABELS, scored) <= TOLERANCE
    totals = label_logprobs(model, tokenizer, CONVS[:2], LABELS)
    for row, tokens in zip(totals, scored):
        assert row == {label: pytest.approx(sum(lps), abs=1e-6) for label, lps in tokens.items()}


def test_prefix_cached_trie_scores_equal_brute_force_on_smollm2(smollm2, monkeypatch):
    """The same prompts, their shared start (SmolLM2's default system turn, ~30 tokens) run once
    through a PrefixCache: the threshold is lowered so the brute force stays a short forward per label."""
    from pipeline.llm import encoding
    from pipeline.llm.scoring import label_token_logprobs

    model, tokenizer = smollm2
    monkeypatch.setattr(encoding, "MIN_SHARED_PREFIX", 8)
    cache = encoding.PrefixCache()
    scored = label_token_logprobs(model, tokenizer, CONVS[:2], LABELS, cache)
    assert len(cache.ids) >= 8 and cache.kv is not None
    assert worst_difference(model, tokenizer, CONVS[:2], LABELS, scored) <= TOLERANCE


def test_prefix_cached_trie_scores_equal_brute_force_on_tiny(tiny_llama_dir):
    """A long shared instruction (above MIN_SHARED_PREFIX), and a second batch on the kept prefix."""
    from pipeline.llm.encoding import MIN_SHARED_PREFIX, PrefixCache
    from pipeline.llm.scoring import label_token_logprobs

    model, tokenizer = _tiny("llama", "sdpa", tiny_llama_dir)
    cache = PrefixCache()
    first = label_token_logprobs(model, tokenizer, SHARED[:2], LABELS, cache)
    again = label_token_logprobs(model, tokenizer, SHARED[1:], LABELS, cache)
    assert len(cache.ids) >= MIN_SHARED_PREFIX and cache.hits == 1
    assert worst_difference(model, tokenizer, SHARED[:2], LABELS, first) <= TOLERANCE
    assert worst_difference(model, tokenizer, SHARED[1:], LABELS, again) <= TOLERANCE


def test_a_large_batch_scored_in_several_passes_equals_brute_force(tiny_llama_dir, monkeypatch):
    """The logits' memory bound splits the trie over passes; later passes attend to the cached ancestors."""
    from pipeline.llm import scoring

    model, tokenizer = _tiny("llama", "sdpa", tiny_llama_dir)
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))
    monkeypatch.setattr(scoring, "MAX_LOGIT_ROWS", 31)  # 10 trie nodes a pass for 3 prompts
    scored = scoring.label_token_logprobs(model, tokenizer, CONVS, LABELS)
    assert len(passes) > 30
    assert worst_difference(model, tokenizer, CONVS, LABELS, scored) <= TOLERANCE


def test_each_prompt_and_trie_node_runs_once(tiny_llama_dir):
    """The work is the prompts plus the trie's inner nodes, once per prompt: no label is run on
    its own, padded to another's length, or given a copy of the prompt's cache."""
    from pipeline.llm.encoding import render_prompts
    from pipeline.llm.scoring import label_token_ids, label_token_logprobs

    model, tokenizer = _tiny("llama", "sdpa", tiny_llama_dir)
    rows = []
    model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape))
    label_token_logprobs(model, tokenizer, CONVS, LABELS)
    padded = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in render_prompts(tokenizer, CONVS))
    inner = LabelTrie.build(label_token_ids(tokenizer, LABELS)).inner_nodes()
    assert {batch for batch, _ in rows} == {len(CONVS)}
    assert sum(width for _, width in rows) == padded + len(inner)


def test_a_sliding_window_the_trie_would_overflow_is_refused(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    from pipeline.llm.scoring import label_logprobs

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="sliding attention window"):
        label_logprobs(model, tokenizer, CONVS[:1], LABELS)
    assert label_logprobs(model, tokenizer, CONVS[1:2], ["x", "y"])[0].keys() == {"x", "y"}


def test_on_cpu_the_trie_reads_grouped_kv_heads_without_copying_them(tiny_llama_dir, monkeypatch):
    """The tree mask would make transformers copy each layer's KV heads out to the query heads
    (repeat_kv); on CPU the pass asks torch's kernel for grouped heads instead, and leaves
    transformers' switch as it found it, after an error too."""
    import transformers.integrations.sdpa_attention as sdpa

    from pipeline.llm.scoring import FORCE_GQA, label_logprobs

    model, tokenizer = _tiny("mistral", "sdpa", tiny_llama_dir)
    copies = []
    shipped = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a: copies.append(a[0].shape) or shipped(*a))
    monkeypatch.delenv(FORCE_GQA, raising=False)
    label_logprobs(model, tokenizer, CONVS, LABELS)
    assert copies == [] and FORCE_GQA not in os.environ
    monkeypatch.setenv(FORCE_GQA, "0")

    def fail(*_):
        raise RuntimeError("interrupted mid-pass")

    model.get_input_embeddings().register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="mid-pass"):
        label_logprobs(model, tokenizer, CONVS, LABELS)
    assert os.environ[FORCE_GQA] == "0"
