"""Guided decoding to a label set: every answer is a label, and it stops right after it."""

import pytest

from pipeline.llm.constrained import label_token_trie
from pipeline.llm.generate import generate_batch
from pipeline.llm.loading import device_plan, load_model, load_tokenizer

LABELS = ["track_order", "refund_status", "promo_code"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device_plan()).eval(), load_tokenizer(str(tiny_llama_dir))


def test_trie_spells_each_label_then_eos(tiny):
    _, tok = tiny
    trie = label_token_trie(tok, LABELS)
    for label in LABELS:
        node = trie
        for t in tok(label, add_special_tokens=False)["input_ids"]:
            node = node[t]
        assert list(node) == [tok.eos_token_id]


def test_random_model_constrained_answers_only_labels(tiny):
    model, tok = tiny
    convs = [[{"role": "user", "content": text}] for text in ["where is it", "code WINTER10 fails", "hello", "refund?"]]
    free = generate_batch(model, tok, convs, 8)
    assert not all(g.text in LABELS for g in free), "a random model should babble without the constraint"
    guided = generate_batch(model, tok, convs, 8, labels=LABELS)
    assert all(g.text in LABELS and g.stopped for g in guided)
