"""Chat conversations into model inputs: left-padded prompts, or, with a `PrefixCache`, the
prompts' shared prefix (the local teacher's ~430 tokens of instructions and worked examples)
run once, batch size 1, kept for the next batch, and its KV cache handed to the model.

Used by generation (generate.py) and label scoring (scoring.py), which must see the same
tokens and positions for an answer to score what was generated.

With a prefix cache, each prompt's own tail is left-padded after the prefix and the pads are
masked out, so positions and attention are those of the unpadded prompt (tests/llm/test_generate_prefix.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.llm.content_text import prompt_token_ids

if TYPE_CHECKING:
    from transformers import Cache

MIN_SHARED_PREFIX = 64  # tokens; below it the prefix pass costs more than it saves


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Each conversation as the model sees it, ending where the assistant's answer starts."""
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]


class PrefixCache:
    """The KV cache of the last shared prefix, reused by the next batch that starts with it
    (the local teacher's instructions are the same for every batch). One per model."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.kv: Cache | None = None
        self.hits = 0

    def get(self, model, prefix: list[int]):
        """A private copy of the KV cache for `prefix`'s longest part already cached, and that length;
        computed (and kept) when less than MIN_SHARED_PREFIX of it is."""
        import copy

        import torch

        reused = common_prefix_length([self.ids + [-1], prefix + [-2]]) if self.kv is not None else 0
        if reused >= MIN_SHARED_PREFIX:
            self.hits += 1
            kv = copy.deepcopy(self.kv)
            assert kv is not None  # reused > 0 only once a prefix is cached
            if reused < len(self.ids):
                kv.crop(reused - len(self.ids))  # negative: drop that many from the end (every 5.x release)
            return kv, reused
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True)
        self.ids, self.kv = list(prefix), cache_of(out)
        return copy.deepcopy(self.kv), len(prefix)


def cache_of(output):
    """The KV cache a forward pass returned."""
    cache = getattr(output, "cache", None)  # transformers >= 5.2x names it `cache`
    return cache if cache is not None else output.past_key_values


def cache_kwarg(model) -> str:
    """What this transformers release calls the KV cache argument (`past_key_values` before ~5.2x).
    Read off the transformers model itself: a PEFT wrapper's forward passes it on as **kwargs."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def encode_prompts(model, tokenizer, conversations: list[list[dict]], prefix_cache: PrefixCache | None) -> dict:
    """`generate` inputs: left-padded prompts, or the shared-prefix form with its KV cache
    (under `cache_kwarg(model)`, holding the first `get_seq_length()` positions of every row).
    Message content is tokenized as text (content_text.py): no control token from a client."""
    tokenizer.padding_side = "left"
    ids = prompt_token_ids(tokenizer, conversations, render_prompts(tokenizer, conversations))
    encoded = {"input_ids": ids}  # once: the plain path pads these same ids
    shared = common_prefix_length(ids) if prefix_cache is not None and len(ids) > 1 else 0
    if shared < MIN_SHARED_PREFIX:
        return tokenizer.pad(encoded, padding=True, return_tensors="pt").to(model.device)
    assert prefix_cache is not None  # shared is 0 without one
    return _with_prefix_cache(model, tokenizer.pad_token_id, ids, shared, prefix_cache)


def common_prefix_length(ids: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one of its own (generate needs one)."""
    shortest = min(len(row) for row in ids)
    n = 0
    while n < shortest - 1 and all(row[n] == ids[0][n] for row in ids):
        n += 1
    return n


def _with_prefix_cache(model, pad_id: int, ids: list[list[int]], shared: int, prefix_cache: PrefixCache) -> dict:
    import torch

    kv, shared = prefix_cache.get(model, ids[0][:shared])
    kv.batch_repeat_interleave(len(ids))
    tails = [row[shared:] for row in ids]
    width = max(len(t) for t in tails)
    tail_ids = torch.tensor([[pad_id] * (width - len(t)) + t for t in tails], device=model.device)
    tail_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=model.device)
    prefix = torch.tensor([ids[0][:shared]], device=model.device).expand(len(ids), -1)
    return {
        "input_ids": torch.cat([prefix, tail_ids], dim=1),
        "attention_mask": torch.cat([torch.ones_like(prefix), tail_mask], dim=1),
        cache_kwarg(model): kv,
    }
