"""Batched greedy generation over chat conversations, returning Completions.

Used by the local teacher, evaluation, the EOS check, export verification and the router's
student backend: every place a local model answers goes through `generate_batch`.

Shared prefix (with a `PrefixCache`, encoding.py): a batch whose prompts start with the same
tokens runs that prefix once and generates from its KV cache; the answers are the ones the
plain path gives (tested).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pipeline.llm.completion import Completion
from pipeline.llm.content_text import prompt_token_ids
from pipeline.llm.encoding import PrefixCache, encode_prompts, render_prompts
from pipeline.llm.scoring import label_logprobs_after_generation, label_token_ids, label_token_logprobs


def generate_batch(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    labels: list[str] | None = None,
    source: str = "",
    score_labels: list[str] | None = None,
    prefix_cache: PrefixCache | None = None,
    decode: str = "generate",
    schema: dict | None = None,
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
    enc = encode_prompts(model, tokenizer, conversations, prefix_cache)
    constraint: dict[str, Any] = {}
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
            output_logits=bool(score_labels),  # raw: the label scores start from the first step's
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **constraint,
        )
    new_tokens = out.sequences[:, enc["input_ids"].shape[1] :]
    logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
    chosen = logprobs.gather(-1, new_tokens[:, : logprobs.shape[1], None]).squeeze(-1)
    prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
    scores: Sequence[dict[str, float] | None] = [None] * len(conversations)
    if score_labels:
        scores = label_logprobs_after_generation(model, tokenizer, enc, out, score_labels)
    per_item_ms = int((time.perf_counter() - start) * 1000 / max(len(conversations), 1))
    results = []
    for row, lp, prompt_len, label_lp in zip(new_tokens.tolist(), chosen.tolist(), prompt_lengths, scores):
        length = next((i for i, t in enumerate(row) if t == tokenizer.eos_token_id), None)
        n = length if length is not None else len(row)
        results.append(
            Completion(
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
            )
        )
    return results


def _field_logprobs(tokenizer, ids: list[int], logprobs: list[float]) -> dict[str, float] | None:
    from pipeline.llm.structured import decoded_pieces, field_logprobs

    return field_logprobs(decoded_pieces(tokenizer, ids), logprobs)


def _answer_by_label_posterior(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    labels: list[str] | None,
    source: str,
    start: float,
) -> list[Completion]:
    """The label whose tokens (EOS included) are most likely after the prompt: what a closed-set
    classifier answers. The answer's token log-probs are that label's teacher-forced ones, so the
    token signals read the same kind of numbers as after generation. A label longer than
    `max_new_tokens` is cut there and ends by length, as a generated one would."""
    if not labels:
        raise ValueError("decode=label_posterior needs the labels to score (score_labels)")
    scored = label_token_logprobs(model, tokenizer, conversations, labels)
    token_ids = dict(zip(labels, label_token_ids(tokenizer, labels)))
    # Counted as the scorer encoded them: message content as text (content_text.py).
    prompt_lengths = [
        len(ids) for ids in prompt_token_ids(tokenizer, conversations, render_prompts(tokenizer, conversations))
    ]
    per_item_ms = int((time.perf_counter() - start) * 1000 / max(len(conversations), 1))
    results = []
    for prompt_length, scores in zip(prompt_lengths, scored):
        best = max(labels, key=lambda label: sum(scores[label]))  # ties: the first label of the task's list
        ids = token_ids[best][:-1]  # the label's tokens; EOS is scored but, as after generation, not kept
        stopped = len(ids) < max_new_tokens  # room for the label and its EOS
        n = len(ids) if stopped else max_new_tokens
        results.append(
            Completion(
                text=best if stopped else tokenizer.decode(ids[:n], skip_special_tokens=True).strip(),
                source=source,
                prompt_tokens=prompt_length,
                completion_tokens=n,
                token_ids=ids[:n],
                token_logprobs=scores[best][: max(n, 1)],
                finish_reason="stop" if stopped else "length",
                latency_ms=per_item_ms,
                label_logprobs={label: sum(v) for label, v in scores.items()},
            )
        )
    return results
