"""Batched greedy generation over chat conversations, returning Completions.

Used by the local teacher, evaluation, the EOS check, export verification and the router's
student backend: every place a local model answers goes through `generate_batch`.

Shared prefix (with a `PrefixCache`): a batch whose prompts start with the same tokens (the
local teacher's ~430 tokens of instructions and worked examples) runs that prefix once,
batch size 1, kept for the next batch, and generates from its KV cache; only each prompt's
own tail is run per row. The tails are
left-padded after the prefix, the pads masked out, so positions and attention are those of
the unpadded prompt and the answers are the ones the plain path gives (tested).
"""

from __future__ import annotations

import time

from pipeline.llm.completion import Completion


def generate_batch(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, labels: list[str] | None = None,
    source: str = "", score_labels: list[str] | None = None, prefix_cache: PrefixCache | None = None,
    decode: str = "generate", schema: dict | None = None,
) -> list[Completion]:
    """Greedy, batched generation (left padding). With `labels`, decoding is constrained to
    those strings (see constrained.py); with a JSON `schema`, to answers valid against it, and
    each Completion carries its fields' log-probabilities (structured.py). With `score_labels`, each Completion also carries every
    label's teacher-forced log-likelihood (scoring.py), which the label-posterior signals read;
    `decode="label_posterior"` then answers with the most likely of them and generates nothing.
    Latency is the batch's wall time split evenly."""
    import torch

    from pipeline.llm.constrained import allowed_tokens_fn

    start = time.perf_counter()
    if decode == "label_posterior":
        return _answer_by_label_posterior(model, tokenizer, conversations, max_new_tokens, score_labels, source, start)
    if decode != "generate":
        raise ValueError(f"decode must be generate or label_posterior, not {decode!r}")
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    enc = _encode(model, tokenizer, conversations, prompts, prefix_cache)
    constraint = {}
    if labels:
        constraint["prefix_allowed_tokens_fn"] = allowed_tokens_fn(tokenizer, labels, enc["input_ids"].shape[1])
    if schema is not None:
        from pipeline.llm.structured import SchemaLogitsProcessor

        constraint["logits_processor"] = [SchemaLogitsProcessor(tokenizer, schema)]
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **constraint,
        )
    new_tokens = out.sequences[:, enc["input_ids"].shape[1]:]
    logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
    chosen = logprobs.gather(-1, new_tokens[:, : logprobs.shape[1], None]).squeeze(-1)
    prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
    scores = [None] * len(conversations)
    if score_labels:
        from pipeline.llm.scoring import label_logprobs

        scores = label_logprobs(model, tokenizer, conversations, score_labels, prefix_cache)
    per_item_ms = int((time.perf_counter() - start) * 1000 / max(len(conversations), 1))
    results = []
    for row, lp, prompt_len, label_lp in zip(new_tokens.tolist(), chosen.tolist(), prompt_lengths, scores):
        length = next((i for i, t in enumerate(row) if t == tokenizer.eos_token_id), None)
        n = length if length is not None else len(row)
        results.append(Completion(
            text=tokenizer.decode(row[:n], skip_special_tokens=True).strip(),
            source=source,
            prompt_tokens=int(prompt_len),
            completion_tokens=n,
            token_ids=row[:n],
            token_logprobs=lp[: max(n, 1)],
            finish_reason="stop" if length is not None else "length",
            latency_ms=per_item_ms,
            label_logprobs=label_lp,
            field_logprobs=_field_logprobs(tokenizer, row[:n], lp[:n]) if schema is not None else None,
        ))
    return results


def _field_logprobs(tokenizer, ids: list[int], logprobs: list[float]) -> dict[str, float] | None:
    from pipeline.llm.structured import decoded_pieces, field_logprobs

    return field_logprobs(decoded_pieces(tokenizer, ids), logprobs)


def _answer_by_label_posterior(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int,
                               labels: list[str] | None, source: str, start: float) -> list[Completion]:
    """The label whose tokens (EOS included) are most likely after the prompt: what a closed-set
    classifier answers. The answer's token log-probs are that label's teacher-forced ones, so the
    token signals read the same kind of numbers as after generation. A label longer than
    `max_new_tokens` is cut there and ends by length, as a generated one would."""
    from pipeline.llm.scoring import label_token_ids, label_token_logprobs

    if not labels:
        raise ValueError("decode=label_posterior needs the labels to score (score_labels)")
    scored = label_token_logprobs(model, tokenizer, conversations, labels)
    token_ids = dict(zip(labels, label_token_ids(tokenizer, labels)))
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    per_item_ms = int((time.perf_counter() - start) * 1000 / max(len(conversations), 1))
    results = []
    for prompt, scores in zip(prompts, scored):
        best = max(labels, key=lambda label: sum(scores[label]))  # ties: the first label of the task's list
        ids = token_ids[best][:-1]  # the label's tokens; EOS is scored but, as after generation, not kept
        stopped = len(ids) < max_new_tokens  # room for the label and its EOS
        n = len(ids) if stopped else max_new_tokens
        results.append(Completion(
            text=best if stopped else tokenizer.decode(ids[:n], skip_special_tokens=True).strip(),
            source=source,
            prompt_tokens=len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
            completion_tokens=n,
            token_ids=ids[:n],
            token_logprobs=scores[best][: max(n, 1)],
            finish_reason="stop" if stopped else "length",
            latency_ms=per_item_ms,
            label_logprobs={label: sum(v) for label, v in scores.items()},
        ))
    return results


MIN_SHARED_PREFIX = 64  # tokens; below it the prefix pass costs more than it saves


class PrefixCache:
    """The KV cache of the last shared prefix, reused by the next batch that starts with it
    (the local teacher's instructions are the same for every batch). One per model."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.kv = None
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
            if reused < len(self.ids):
                kv.crop(reused - len(self.ids))  # negative: drop that many from the end (every 5.x release)
            return kv, reused
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True)
        self.ids, self.kv = list(prefix), _cache_of(out)
        return copy.deepcopy(self.kv), len(prefix)


def _cache_of(output):
    cache = getattr(output, "cache", None)  # transformers >= 5.2x names it `cache`
    return cache if cache is not None else output.past_key_values


def _encode(model, tokenizer, conversations: list[list[dict]], prompts: list[str],
            prefix_cache: PrefixCache | None) -> dict:
    """`generate` inputs: left-padded prompts, or the shared-prefix form with its KV cache.
    Message content is tokenized as text (content_text.py): no control token from a client."""
    from pipeline.llm.content_text import prompt_token_ids

    tokenizer.padding_side = "left"
    ids = prompt_token_ids(tokenizer, conversations, prompts)  # once: the plain path pads these same ids
    encoded = {"input_ids": ids}
    shared = common_prefix_length(ids) if prefix_cache is not None and len(ids) > 1 else 0
    if shared < MIN_SHARED_PREFIX:
        return tokenizer.pad(encoded, padding=True, return_tensors="pt").to(model.device)
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
        _cache_kwarg(model): kv,
    }


def _cache_kwarg(model) -> str:
    """What this transformers release calls the KV cache argument (`past_key_values` before ~5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
