"""Teacher-forced scoring of a closed label set: the log-likelihood of every label's full
token sequence (the label's tokens, then EOS, which ends the assistant turn) after a prompt.

    .venv/bin/python -c "from pipeline.llm.scoring import label_logprobs; help(label_logprobs)"

Why not read the confidence off generation: greedy decoding sees one path, and the mean
token log-probability is biased by the answer's length. The label posterior
softmax(log p(label | prompt)) compares every label on equal terms; the policy reads it
(pipeline/llm/policy.py, signals label_prob and label_margin).

The labels are a token trie (label_trie.py) and the prompts and the trie's nodes run in one
forward pass (a few for a large batch, to bound the logits' memory): each node attends to its
prompt and its own ancestors only, through a tree attention mask, at the position it has after
its prompt. Every distinct label prefix is run once per prompt, the prompt's KV cache is never
copied, and no label is padded: Banking77's 77 labels (558 tokens with their EOS) are 382 nodes.
A leaf, a label's EOS, is predicted by its parent and never run. After generation (a teacher
recording `teacher.label_distribution`), generate's own KV cache of the prompts is reused and only
the trie's nodes run (label_logprobs_after_generation).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

from pipeline.llm.encoding import cache_kwarg, cache_of, encode_prompts
from pipeline.llm.label_trie import LabelTrie

# Rows of next-token logits (one per prompt and trie node) a forward pass computes at most: a
# 77-label batch of 16 over a 49k vocabulary is then 3 passes of ~400 MB of fp32 logits each.
MAX_LOGIT_ROWS = 2048
FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def posterior(label_logprobs: dict[str, float], temperature: float = 1.0) -> dict[str, float]:
    """softmax(log p(label | prompt) / temperature) over the labels."""
    top = max(label_logprobs.values())
    weights = {label: math.exp((v - top) / temperature) for label, v in label_logprobs.items()}
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


def label_token_ids(tokenizer, labels: list[str]) -> list[list[int]]:
    """Each label's tokens as the constrained decoder emits them (constrained.py), EOS included."""
    return [tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for label in labels]


def label_logprobs(
    model, tokenizer, conversations: list[list[dict]], labels: list[str], prefix_cache=None
) -> list[dict[str, float]]:
    """For each conversation, {label: sum of log p(token) over the label's tokens + EOS}."""
    return [
        {label: sum(lps) for label, lps in row.items()}
        for row in label_token_logprobs(model, tokenizer, conversations, labels, prefix_cache)
    ]


def label_token_logprobs(
    model, tokenizer, conversations: list[list[dict]], labels: list[str], prefix_cache=None
) -> list[dict[str, list[float]]]:
    """For each conversation, {label: log p of each of the label's tokens, EOS last}. With a
    `prefix_cache` (encoding.PrefixCache) the prompts' shared prefix (a teacher's instructions)
    is not recomputed."""
    if not conversations:
        return []
    enc = encode_prompts(model, tokenizer, conversations, prefix_cache)
    trie = LabelTrie.build(label_token_ids(tokenizer, labels))
    return _by_label(_trie_node_logprobs(model, enc, trie), labels, trie)


def _by_label(node_logprobs, labels: list[str], trie: LabelTrie) -> list[dict[str, list[float]]]:
    """[prompts, trie nodes] log-probs -> per prompt, {label: its tokens' log-probs along its path}."""
    return [
        {label: [row[node] for node in path] for label, path in zip(labels, trie.paths)}
        for row in node_logprobs.tolist()
    ]


def label_logprobs_after_generation(
    model, tokenizer, enc: dict, generated, labels: list[str]
) -> list[dict[str, float]]:
    """`label_logprobs` for the prompts `generate` has just answered (`enc`, its inputs; `generated`,
    its output with `output_logits`): its KV cache, cut back to the prompts, and its first step's raw
    logits stand for the prompt pass, so only the trie's inner nodes run."""
    cache = cache_of(generated)
    cache.crop(enc["input_ids"].shape[1] - cache.get_seq_length())  # negative: drop the generated tokens
    trie = LabelTrie.build(label_token_ids(tokenizer, labels))
    prompts = {**enc, cache_kwarg(model): cache}
    scored = _by_label(_trie_node_logprobs(model, prompts, trie, last_logits=generated.logits[0]), labels, trie)
    return [{label: sum(lps) for label, lps in row.items()} for row in scored]


def _trie_node_logprobs(model, enc: dict, trie: LabelTrie, last_logits=None):
    """[prompts, trie nodes]: log p(node's token | prompt, node's ancestors) for every node. With a
    KV cache covering the whole prompts, `last_logits` are their last position's (what predicts a
    label's first token)."""
    import torch

    inner = trie.inner_nodes()
    prompt_len = enc["attention_mask"].shape[1]
    _check_attention(model, prompt_len + len(inner))
    ids, positions, allowed = _trie_inputs(enc, trie, inner)
    # Node c is predicted where its parent sits: the prompt's last position for a first token.
    column = {node: prompt_len + i for i, node in enumerate(inner)}
    predictor = torch.tensor([column.get(p, prompt_len - 1) for p in trie.parents], device=ids.device)
    target = torch.tensor(trie.tokens, device=ids.device)
    logprobs = torch.empty(ids.shape[0], len(trie.tokens), device=ids.device)
    kv_name = cache_kwarg(model)
    cache = enc.get(kv_name)
    start = cache.get_seq_length() if cache is not None else 0  # positions the prefix cache already holds
    if last_logits is not None:
        first = (predictor == prompt_len - 1).nonzero().flatten()
        logprobs[:, first] = last_logits.float().log_softmax(-1)[:, target[first]]
    step = max(1, MAX_LOGIT_ROWS // ids.shape[0])
    with torch.inference_mode(), _grouped_query_attention(ids.device):
        while start < ids.shape[1]:
            # Every pass after the first one adds inner nodes only; their ancestors are cached already.
            end = min(ids.shape[1], max(start, prompt_len) + step)
            first_kept = max(start, prompt_len - 1)  # logits are needed from the prompt's last position on
            mask = torch.zeros(allowed[:, None, start:end, :end].shape, dtype=model.dtype, device=ids.device)
            mask.masked_fill_(~allowed[:, None, start:end, :end], torch.finfo(model.dtype).min)
            out = model(
                input_ids=ids[:, start:end],
                attention_mask=mask,
                position_ids=positions[:, start:end],
                use_cache=True,
                logits_to_keep=end - first_kept,
                **({kv_name: cache} if cache is not None else {}),
            )
            cache = cache_of(out)
            # log p = logit - logsumexp(logits), the normaliser a slice at a time: no second full-size copy
            norm = torch.cat([part.float().logsumexp(-1) for part in out.logits.split(64, dim=1)], dim=1)
            here = ((predictor >= first_kept) & (predictor < end)).nonzero().flatten()
            rows = predictor[here] - first_kept
            logprobs[:, here] = out.logits[:, rows, target[here]].float() - norm[:, rows]
            start = end
    return logprobs


@contextmanager
def _grouped_query_attention(device):
    """On CPU, attention reads the KV heads as they are. Given a mask (the tree's), transformers'
    sdpa copies every layer's KV heads out to the query heads first (repeat_kv: SmolLM2's 3 to 9,
    over every cached position), while torch's CPU kernel takes the mask and grouped heads
    together. Not on CUDA, where a mask with grouped heads falls back to the math kernel. The
    switch is transformers' own, read at each attention call; the model runs one batch at a time
    (the router's student backend holds a lock), so nothing else sees it."""
    if device.type != "cpu":
        yield
        return
    before = os.environ.get(FORCE_GQA)
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FORCE_GQA]
        else:
            os.environ[FORCE_GQA] = before


def _check_attention(model, length: int) -> None:
    """The tree mask reaches the attention as given only with sdpa and eager, and only while no
    sliding-window cache drops the first keys, whose columns the mask still holds."""
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"label scoring needs sdpa or eager attention (a tree mask); the model uses {attention}")
    window = getattr(model.config, "sliding_window", None)
    if window is not None and length >= window:
        raise ValueError(
            f"label scoring: the prompt and the label trie ({length} tokens) reach "
            f"the model's sliding attention window ({window})"
        )


def _trie_inputs(enc: dict, trie: LabelTrie, inner: list[int]):
    """What each row runs, its (left-padded) prompt then the trie's inner nodes: token ids, positions
    (a node's is its prompt's length + its depth) and the [rows, L, L] tree mask."""
    import torch

    prompt_mask = enc["attention_mask"]
    n_prompts = prompt_mask.shape[0]
    device = prompt_mask.device
    nodes = torch.tensor([trie.tokens[n] for n in inner], device=device, dtype=enc["input_ids"].dtype)
    ids = torch.cat([enc["input_ids"], nodes.expand(n_prompts, -1)], dim=1)
    depths = torch.tensor([trie.depths[n] for n in inner], device=device)
    positions = torch.cat(
        [(prompt_mask.cumsum(-1) - 1).clamp(min=0), prompt_mask.sum(-1, keepdim=True) + depths[None, :]], dim=1
    )
    return ids, positions, _tree_mask(prompt_mask, trie.ancestors_or_self(inner), len(inner))


def _tree_mask(prompt_mask, ancestor_pairs: list[tuple[int, int]], n_nodes: int):
    """[prompts, L, L] booleans, L = prompt length + n_nodes: who may attend to whom. A prompt
    token sees its prompt's real tokens up to itself; a node sees its prompt's real tokens, its
    ancestors and itself; a pad sees itself only (a row with no key would be NaN, and a pad's
    keys and values are read by nobody)."""
    import torch

    n_prompts, prompt_len = prompt_mask.shape
    length = prompt_len + n_nodes
    device = prompt_mask.device
    real = prompt_mask.bool()
    allowed = torch.zeros(n_prompts, length, length, dtype=torch.bool, device=device)
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
    allowed[:, :prompt_len, :prompt_len] = causal[None] & real[:, None, :]
    allowed[:, prompt_len:, :prompt_len] = real[:, None, :]
    tree = torch.zeros(n_nodes, n_nodes, dtype=torch.bool, device=device)
    if ancestor_pairs:
        tree[tuple(torch.tensor(ancestor_pairs, device=device).T)] = True
    allowed[:, prompt_len:, prompt_len:] = tree
    allowed |= torch.eye(length, dtype=torch.bool, device=device)
    return allowed
