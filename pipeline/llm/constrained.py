"""Constrained decoding to a closed label set (guided decoding, as vLLM / llama.cpp grammars do).

A small local teacher asked for "exactly one label" often invents near-labels
("payment_cancel"). For a classification task, restricting its greedy decoding to the
label strings makes every answer valid and picks the label the model itself ranks
highest, token by token. Used by the local teacher when `teacher.constrain_to_labels`.
"""

from __future__ import annotations

from collections.abc import Callable


def label_token_trie(tokenizer, labels: list[str]) -> dict:
    """Trie over each label's token ids, ending in EOS so the answer stops right after it."""
    trie: dict = {}
    for label in labels:
        node = trie
        for token in tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]:
            node = node.setdefault(token, {})
    return trie


def allowed_tokens_fn(tokenizer, labels: list[str], prompt_len: int) -> Callable[[int, object], list[int]]:
    """A `prefix_allowed_tokens_fn` for `generate`: only continuations of some label.

    `prompt_len` is the (left-padded) prompt length, so generated tokens start there for
    every row. After a label is complete only EOS is allowed; after EOS, padding.
    """
    trie = label_token_trie(tokenizer, labels)

    def allowed(batch_id: int, input_ids) -> list[int]:
        node = trie
        for token in input_ids[prompt_len:].tolist():
            if token not in node:  # finished (EOS emitted) or padding after the end
                return [tokenizer.pad_token_id]
            node = node[token]
        return list(node) or [tokenizer.eos_token_id]

    return allowed
