"""Batched greedy generation over chat conversations, returning Completions.

Used by the local teacher, evaluation, the EOS check, export verification and the router's
student backend: every place a local model answers goes through `generate_batch`.
"""

from __future__ import annotations

import time

from pipeline.llm.completion import Completion


def generate_batch(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, labels: list[str] | None = None,
    source: str = "", score_labels: list[str] | None = None,
) -> list[Completion]:
    """Greedy, batched generation (left padding). With `labels`, decoding is constrained to
    those strings (see constrained.py). With `score_labels`, each Completion also carries every
    label's teacher-forced log-likelihood (scoring.py), which the label-posterior signals read.
    Latency is the batch's wall time split evenly."""
    import torch

    from pipeline.llm.constrained import allowed_tokens_fn

    start = time.perf_counter()
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    constraint = {}
    if labels:
        constraint["prefix_allowed_tokens_fn"] = allowed_tokens_fn(tokenizer, labels, enc["input_ids"].shape[1])
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

        scores = label_logprobs(model, tokenizer, conversations, score_labels)
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
        ))
    return results
