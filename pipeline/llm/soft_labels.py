"""Training on the teacher's label distribution (train.soft_labels), not only its answer.

The teacher's distribution q over the task's labels (curate's `teacher_label_probs`) becomes a
target distribution at every answer token, in the student's own tokenization, along the
teacher's answer y*: at answer position t the target over the next token v is

    w * q(next token = v | the label's first t tokens are y*[:t]) + (1 - w) * [v = y*[t]]

with w = train.soft_labels. The conditional is q restricted to the labels that share y*'s
first t tokens (the label trie), so where labels branch the target spreads over the branches,
and past the last branch point it is one-hot. The loss is the cross-entropy of the student's
next-token distribution against that target, summed over answer tokens and divided by their
number, as the hard-label loss is: with a one-hot q (or w = 0) it *is* the hard-label loss.
Its gradient is the gradient of KL(target || student); the teacher's own entropy is a constant.

One forward pass over the teacher's answer, as hard-label training does: no extra sequences
per label. The logits are computed at answer positions only (trainer.py).
"""

from __future__ import annotations

import json
from typing import Any

# Labels kept per example: the fewest covering this much of q, at most MAX_LABELS, renormalised.
# The tail of a 77-way softmax carries ~nothing and would cost a chat-template render each.
MASS = 0.99
MAX_LABELS = 16


def top_labels(probs: dict[str, float]) -> dict[str, float]:
    ranked = sorted(probs.items(), key=lambda kv: (-kv[1], kv[0]))
    kept, mass = [], 0.0
    for label, p in ranked[:MAX_LABELS]:
        kept.append((label, p))
        mass += p
        if mass >= MASS:
            break
    return {label: p / mass for label, p in kept}


def token_targets(
    answer: list[int], label_answers: dict[str, list[int]], probs: dict[str, float], weight: float
) -> tuple[list[list[int]], list[list[float]]]:
    """Per answer token: the candidate next-token ids and their target probabilities (see module doc).
    `answer`: the teacher's answer tokens (EOS included); `label_answers`: each label's answer tokens
    after the same prompt. When the answer is none of them, its targets are one-hot."""
    if answer not in label_answers.values():  # an answer outside the labels scored: nothing to spread along
        label_answers = {}
    ids, targets = [], []
    for t, gold in enumerate(answer):
        mass: dict[int, float] = {}
        for label, tokens in label_answers.items():
            if len(tokens) > t and tokens[:t] == answer[:t] and probs.get(label, 0.0) > 0:
                mass[tokens[t]] = mass.get(tokens[t], 0.0) + probs[label]
        total = sum(mass.values())
        target = {v: weight * m / total for v, m in mass.items()} if total > 0 else {}
        target[gold] = target.get(gold, 0.0) + (1.0 - weight if total > 0 else 1.0)
        target = {v: p for v, p in target.items() if p > 0}
        ids.append(list(target))
        targets.append(list(target.values()))
    return ids, targets


def parse_probs(text: str, where: str) -> dict[str, float] | None:
    if not text:
        return None
    from pipeline.errors import DistillError

    try:
        probs = {str(k): float(v) for k, v in json.loads(text).items()}
    except (ValueError, AttributeError) as err:
        raise DistillError(f"{where}: teacher_label_probs is not a JSON object of label: probability ({err})") from None
    return probs if sum(probs.values()) > 0 else None


# ---------------------------------------------------------------- batches and the loss

SOFT_IDS, SOFT_PROBS = "soft_ids", "soft_probs"


def collate(base_collator):
    """Wrap TRL's collator: the batch also carries [N, K] candidate ids and target probabilities for
    its N answer tokens, in the order the labels tensor holds them (row-major)."""
    import torch

    def call(examples: list[dict[str, Any]]) -> dict[str, Any]:
        if SOFT_IDS not in examples[0]:  # the validation split (train.eval_steps) keeps hard labels
            return base_collator(examples)
        rows = [(ids, probs) for ex in examples for ids, probs in zip(ex[SOFT_IDS], ex[SOFT_PROBS])]
        stripped = [{k: v for k, v in ex.items() if k not in (SOFT_IDS, SOFT_PROBS)} for ex in examples]
        batch = base_collator(stripped)
        width = max(len(ids) for ids, _ in rows)
        batch[SOFT_IDS] = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
        batch[SOFT_PROBS] = torch.tensor([probs + [0.0] * (width - len(probs)) for _, probs in rows])
        return batch

    return call


def soft_label_loss(logits, soft_ids, soft_probs, n):
    """Cross-entropy against the soft targets at every answer token (`logits`: [N, vocab] at the
    answer positions, trainer.answer_logits), summed and divided by n."""
    import torch

    if logits.shape[0] != soft_ids.shape[0]:
        raise RuntimeError(f"soft labels: {soft_ids.shape[0]} targets for {logits.shape[0]} answer tokens")
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, soft_ids)
    per_token = -(soft_probs.to(logp.dtype) * logp).sum(dim=1)
    return per_token.sum() / torch.as_tensor(n, device=per_token.device).clamp(min=1)
