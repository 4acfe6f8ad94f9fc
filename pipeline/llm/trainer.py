"""The trainer finetune runs: TRL's SFTTrainer with a loss that projects the answer tokens only.

Training is completion-only: a classification answer is a few tokens after a prompt ten times
longer. Off CUDA, TRL's fused LM head still projects every position onto the vocabulary, forward
and backward, and accumulates a gradient for the (frozen, tied) embedding matrix: on the embedded
SmolLM2 (49k vocabulary) that was a third of a CPU LoRA step (docs/finetune.md, "Where a CPU step
goes"). Here the model returns logits at answer positions alone (`logits_to_keep`), and the loss
is the same cross-entropy, summed over answer tokens and divided by their number across the
accumulated batch (`num_items_in_batch`), label smoothing included: equal to TRL's on the same
batch, padded and padding-free (tests/finetune/test_answer_loss.py). Soft targets
(soft_labels.py) read the same logits.

On CUDA with Triton, TRL's kernel already projects the answer positions only, in bounded tiles
(what the VRAM planner counts), so plain hard-label training keeps TRL's loss there; label
smoothing and soft targets take this path everywhere (TRL would run a second, full-logits forward).
"""

from __future__ import annotations

from pipeline.llm import soft_labels


def answer_logits(model, inputs: dict):
    """The next-token logits at answer positions only, [N, vocab] in row-major order (as the soft-label
    collator lays its targets out), the N answer tokens they predict, and the model's outputs."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    answer = labels[:, 1:] != -100  # logits at position p predict the token at p + 1
    keep = answer.any(dim=0).nonzero().flatten()  # a padded batch: the union of its rows' positions
    outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
    return outputs.logits[answer[:, keep]], labels[:, 1:][answer], outputs


def trl_projects_answers_only(labels) -> bool:
    """Whether TRL's fused LM head runs its Triton kernel here, which projects the answer positions
    only (trl/trainer/utils.py: `compact`); elsewhere it projects every position."""
    import importlib.util

    return labels.device.type == "cuda" and importlib.util.find_spec("triton") is not None


def hard_label_loss(logits, targets, n, label_smoothing: float = 0.0):
    """Cross-entropy of each answer token, summed and divided by n (the batch's answer tokens)."""
    import torch
    import torch.nn.functional as F

    total = F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)
    return total / torch.as_tensor(n, device=total.device).clamp(min=1)


def trainer_class():
    """SFTTrainer computing its loss from the answer positions' logits; it also keeps the soft-target
    columns (train.soft_labels) and trains on them when a batch has them."""
    from trl import SFTTrainer

    class AnswerTokenTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            import warnings

            with warnings.catch_warnings():  # TRL's warning of a second forward pass for label smoothing: not here
                warnings.filterwarnings(
                    "ignore", message="`label_smoothing_factor` is deprecated", category=FutureWarning
                )
                super().__init__(*args, **kwargs)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, soft_labels.SOFT_IDS, soft_labels.SOFT_PROBS]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            soft = {k: inputs.pop(k) for k in (soft_labels.SOFT_IDS, soft_labels.SOFT_PROBS) if k in inputs}
            if not soft and not self.args.label_smoothing_factor and trl_projects_answers_only(inputs["labels"]):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            logits, targets, outputs = answer_logits(model, inputs)
            n = num_items_in_batch if num_items_in_batch is not None else targets.numel()
            if soft:
                loss = soft_labels.soft_label_loss(logits, soft[soft_labels.SOFT_IDS], soft[soft_labels.SOFT_PROBS], n)
            else:
                loss = hard_label_loss(logits, targets, n, self.args.label_smoothing_factor)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages the gradients
            self._log_answer_metrics("train" if model.training else "eval", logits.detach(), targets)
            return (loss, outputs) if return_outputs else loss

        def _log_answer_metrics(self, mode: str, logits, targets) -> None:
            """TRL's per-step entropy and mean_token_accuracy, over the same answer tokens."""
            import torch

            logp = torch.log_softmax(logits.float(), dim=-1)
            gather = self.accelerator.gather_for_metrics
            count = gather(torch.tensor(float(targets.numel()), device=logits.device)).sum()
            entropy = gather(-(logp.exp() * logp).sum()).sum()
            correct = gather((logits.argmax(-1) == targets).sum().float()).sum()
            metrics = self._metrics[mode]
            metrics["entropy"].append((entropy / count).item() if count > 0 else 0.0)
            metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

    return AnswerTokenTrainer
