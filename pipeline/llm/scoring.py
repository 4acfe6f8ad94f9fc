"""Teacher-forced scoring of a closed label set: the log-likelihood of every label's full
token sequence (the label's tokens, then EOS, which ends the assistant turn) after a prompt.

    .venv/bin/python -c "from pipeline.llm.scoring import label_logprobs; help(label_logprobs)"

Why not read the confidence off generation: greedy decoding sees one path, and the mean
token log-probability is biased by the answer's length. The label posterior
softmax(log p(label | prompt)) compares every label on equal terms; the policy reads it
(pipeline/llm/policy.py, signals label_prob and label_margin).

Each prompt is encoded once; its KV cache is repeated for the labels, so scoring 12 labels
costs one prompt pass plus 12 short continuations, batched by label length.
"""

from __future__ import annotations

import math


def posterior(label_logprobs: dict[str, float], temperature: float = 1.0) -> dict[str, float]:
    """softmax(log p(label | prompt) / temperature) over the labels."""
    top = max(label_logprobs.values())
    weights = {label: math.exp((v - top) / temperature) for label, v in label_logprobs.items()}
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


def label_token_ids(tokenizer, labels: list[str]) -> list[list[int]]:
    """Each label's tokens as the constrained decoder emits them (constrained.py), EOS included."""
    return [tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for label in labels]


def label_logprobs(model, tokenizer, conversations: list[list[dict]], labels: list[str],
                   prefix_cache=None) -> list[dict[str, float]]:
    """For each conversation, {label: sum of log p(token) over the label's tokens + EOS}."""
    return [{label: sum(lps) for label, lps in row.items()}
            for row in label_token_logprobs(model, tokenizer, conversations, labels, prefix_cache)]


def label_token_logprobs(model, tokenizer, conversations: list[list[dict]], labels: list[str],
                         prefix_cache=None) -> list[dict[str, list[float]]]:
    """For each conversation, {label: log p of each of the label's tokens, EOS last}. With a
    `prefix_cache` (generate.PrefixCache) the prompts' shared prefix (a teacher's instructions)
    is not recomputed."""
    import copy

    import torch

    from pipeline.llm.generate import _cache_kwarg, _encode

    if not conversations:
        return []
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    enc = _encode(model, tokenizer, conversations, prompts, prefix_cache)
    n_prompts = len(prompts)
    seqs = label_token_ids(tokenizer, labels)
    prompt_mask = enc["attention_mask"]
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cached = enc.get(_cache_kwarg(model))
    shared = cached.get_seq_length() if cached is not None else 0  # positions the prefix cache already holds
    per_label: list[dict[int, list[float]]] = [{} for _ in range(n_prompts)]
    with torch.inference_mode():
        first = model(input_ids=enc["input_ids"][:, shared:], attention_mask=prompt_mask,
                      position_ids=prompt_pos[:, shared:], use_cache=True,
                      **({_cache_kwarg(model): cached} if cached is not None else {}))
        # transformers renamed `past_key_values` to `cache` during 5.x (the old name warns, then
        # goes): use whichever this version returns.
        cache_name = "cache" if "cache" in first else "past_key_values"
        next_logprobs = first.logits[:, -1, :].float().log_softmax(-1)
        buckets = _by_length(seqs)
        for n, (length, members) in enumerate(buckets):
            # Labels of one token length together: no label pays for the longest one's padding
            # (Banking77's labels are 4-18 tokens, 7 on average). The last bucket takes the cache itself.
            cache = first[cache_name] if n == len(buckets) - 1 else copy.deepcopy(first[cache_name])
            cache.batch_repeat_interleave(len(members))  # row i*m + j: prompt i continued by label members[j]
            ids = torch.tensor([seqs[j] for j in members], device=model.device).repeat(n_prompts, 1)
            lengths = prompt_mask.sum(-1).repeat_interleave(len(members))
            positions = lengths[:, None] + torch.arange(length, device=model.device)[None, :]
            full_mask = torch.cat([prompt_mask.repeat_interleave(len(members), dim=0),
                                   torch.ones_like(ids)], dim=1)
            out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, **{cache_name: cache})
            # Token 0 of each label is predicted by the prompt's last position, token t by label token t-1.
            first_lp = next_logprobs.repeat_interleave(len(members), dim=0).gather(-1, ids[:, :1]).squeeze(-1)
            rest_lp = out.logits[:, :-1, :].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            token_lp = torch.cat([first_lp[:, None], rest_lp], dim=1).view(n_prompts, len(members), length)
            for i, row in enumerate(token_lp.tolist()):
                per_label[i].update(zip(members, row))
    return [{label: row[j] for j, label in enumerate(labels)} for row in per_label]


def _by_length(seqs: list[list[int]]) -> list[tuple[int, list[int]]]:
    """(token length, indices of the labels that long), shortest first."""
    groups: dict[int, list[int]] = {}
    for i, seq in enumerate(seqs):
        groups.setdefault(len(seq), []).append(i)
    return sorted(groups.items())
