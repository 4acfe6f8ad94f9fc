"""The `merged` export: base + adapter merged into one plain transformers folder, re-checked.

    distill export RECIPE

The merge happens on an unquantized base (fp32 on CPU, bf16 on CUDA: never into 4-bit
weights, whatever training used), and the weights are saved in the base's own dtype with the
tokenizer, its chat template and a generation config whose EOS is the token training taught
the student to end on. The folder is reloaded with nothing but transformers, in the dtype and
on the device base + adapter ran in, and compared with it on the verification prompts:

- logits: teacher-forced on base + adapter's greedy answer, the largest |Δ log-softmax| over
  the whole vocabulary at every answer position (and the stop after it) must stay within
  `export.verify_logprob_tolerance`. Rounding alone moves it: measured on SmolLM2-135M with a
  random LoRA on every linear (r=16, B at 0.1 of PEFT's random init), 8e-5 nats with fp32
  weights and compute, 0.24 with the merged weights stored bf16, 0.93 with bf16 compute; a
  dropped adapter moved it 3.4-4.1, one weight changed by +1.0 0.036 (fp32), the LoRA scale
  x1.25 0.83 (fp32). The default bar follows the coarser of the two dtypes.
- greedy answers: the share of prompts answered token for token alike must reach
  `export.verify_min_agreement` (a near-tie may flip in bf16; the logits bar is the sharp one).

Either miss fails the export; the figures are in verification.json and the stage's metrics.
It is the folder `vllm serve` and `AutoModelForCausalLM.from_pretrained` take.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.artifacts import EXPORT_MERGED, atomic_write_json
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion
from pipeline.llm.loading import free_memory, hub_access

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


# Default `export.verify_logprob_tolerance` by the coarser dtype of the merged weights and the
# check (nats). fp32: ~12x the 8e-5 measured above. bf16/fp16: twice the worst rounding measured
# (0.93), under a dropped adapter's 3.4 there; where an adapter moves less than the bar (the
# 2-layer random test model: 1.4) a warning says so and greedy agreement is what catches it.
DEFAULT_LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 2.0, "float16": 2.0}


# Default `export.f16_logprob_tolerance` by the dtype the merged model ran the check in (nats). F16
# is held to the merged model as it ran there, never to a second, fp32 copy of a 7B on the host.
# Measured on SmolLM2-135M, 4 prompts x 12 tokens (bench/bench_f16_reference.py, bench/results/
# f16_reference.json): the F16 file's gap is 0.015 nats from fp32 references, 0.11 from bf16 ones;
# a wrong tensor moves whole nats. Each bar is ~4-17x what rounding alone gave.
DEFAULT_F16_LOGPROB_TOLERANCE = {"float32": 0.25, "bfloat16": 0.5, "float16": 0.5}


def f16_tolerance(configured: float | None, dtype) -> float:
    """`export.f16_logprob_tolerance`, or its default for the dtype merged ran in."""
    return configured if configured is not None else DEFAULT_F16_LOGPROB_TOLERANCE.get(_dtype_name(dtype), 0.5)


@dataclass(frozen=True)
class MergedExport:
    folder: str  # relative to the stage folder
    verified_prompts: int
    answers: list[Completion]  # the reloaded folder's greedy answers: the reference F16 must reproduce
    load_s: float
    model: PreTrainedModel  # the reloaded merged model, for the parity run
    max_logprob_delta: float = 0.0  # nats, merged vs base + adapter (see the module docstring)
    greedy_agreement: float = 1.0  # share of verification prompts with identical greedy tokens
    logprob_tolerance: float = 0.0  # the bar max_logprob_delta was held to
    adapter_logprob_effect: float = 0.0  # the same figure between base + adapter and the base alone


@dataclass(frozen=True)
class Reference:
    """What base + adapter answered, recorded before the merge consumes it: all the check needs of it."""

    expected: list[Completion]
    logprobs: list  # per prompt, fp32 CPU log-softmax rows (answer_logprobs)
    adapter_effect: float
    dtype: object
    device: object


def export_merged(
    load_adapted: Callable[[], object],
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    out: Path,
    save_dtype=None,
    logprob_tolerance: float | None = None,
    min_agreement: float = 0.75,
) -> MergedExport:
    """`load_adapted()` returns a PeftModel on an unquantized base; it is consumed by the merge. It is a
    loader, not a model, so that no caller keeps the weights alive: base + adapter answer the
    verification prompts, are merged and saved, and every reference to them is dropped and collected
    before the saved folder is loaded back, so one copy of the model is in memory at a time (a bf16 7B
    is 13.5 GiB; two would not fit a 24 GB A10G).
    `save_dtype`: the base's dtype (None: keep the dtype it was merged in).
    `logprob_tolerance` None: DEFAULT_LOGPROB_TOLERANCE of the coarser of save and compute dtype."""
    reference = _merge_and_save(load_adapted(), tokenizer, conversations, max_new_tokens, out, save_dtype)
    free_memory()

    import time

    start = time.perf_counter()
    reloaded = reload_plain(out / EXPORT_MERGED, reference.dtype, reference.device)
    load_s = time.perf_counter() - start
    got = _answers(reloaded, tokenizer, conversations, max_new_tokens)
    deltas = [
        float((answer_logprobs(reloaded, tokenizer, c, generated_ids(e)) - ref).abs().max())
        for c, e, ref in zip(conversations, reference.expected, reference.logprobs)
    ]
    expected, effect = reference.expected, reference.adapter_effect
    saved = _dtype_name(save_dtype or reference.dtype)
    coarsest = min((_dtype_name(reference.dtype), saved), key=lambda d: _MANTISSA_BITS.get(d, 0))
    tolerance = logprob_tolerance if logprob_tolerance is not None else DEFAULT_LOGPROB_TOLERANCE.get(coarsest, 2.0)
    mismatches = [
        (c[-1]["content"], e, g) for c, e, g in zip(conversations, expected, got) if e.token_ids != g.token_ids
    ]
    agreement = 1 - len(mismatches) / max(len(conversations), 1)
    worst = max(range(len(deltas)), key=deltas.__getitem__, default=None)
    max_delta = deltas[worst] if worst is not None else 0.0
    compute = f"{_dtype_name(reference.dtype)} on {reference.device}"
    atomic_write_json(
        out / "verification.json",
        {
            "prompts": len(conversations),
            "mismatches": len(mismatches),
            "greedy_agreement": agreement,
            "min_agreement": min_agreement,
            "max_logprob_delta": max_delta,
            "logprob_tolerance": tolerance,
            "logprob_deltas": deltas,
            "adapter_logprob_effect": effect,
            "compute": compute,
            "saved_dtype": saved,
            "expected": [c.text for c in expected],
            "merged": [c.text for c in got],
        },
    )
    where = f"(base + adapter in {compute}, merged weights saved as {saved}; {out / 'verification.json'})"
    if effect <= tolerance:
        log.warning(
            "export: the adapter moves log-probabilities by at most %.3g nats, within the %.3g-nat tolerance: "
            "the logits check cannot tell a dropped adapter from a correct merge here, only greedy agreement "
            "can (export.verify_logprob_tolerance)",
            effect,
            tolerance,
        )
    if max_delta > tolerance:
        assert worst is not None  # the tolerance is > 0 (config), so some delta exceeds it
        raise DistillError(
            f"export: merged model's log-probabilities differ from base+adapter's by up to {max_delta:.4g} nats, "
            f"over export.verify_logprob_tolerance={tolerance:g}, on '{conversations[worst][-1]['content'][:60]}' "
            f"{where}: the merge is wrong"
        )
    if agreement < min_agreement:
        prompt, e, g = mismatches[0]
        raise DistillError(
            f"export: merged model gives base+adapter's greedy answer on {agreement:.0%} of {len(conversations)} "
            f"verification prompts, under export.verify_min_agreement={min_agreement:g} (first, '{prompt[:60]}': "
            f"{e.text!r} vs {g.text!r}; largest log-probability difference {max_delta:.4g} nats) {where}"
        )
    return MergedExport(
        EXPORT_MERGED, len(conversations), got, load_s, reloaded, max_delta, agreement, tolerance, effect
    )


def _merge_and_save(
    adapted, tokenizer, conversations: list[list[dict]], max_new_tokens: int, out: Path, save_dtype
) -> Reference:
    """Record base + adapter's answers and log-probabilities, merge, save; the model dies with this frame."""
    if getattr(adapted, "is_loaded_in_4bit", False) or getattr(adapted, "is_loaded_in_8bit", False):
        raise DistillError("export: refusing to merge into a quantized base; load it unquantized")
    if not tokenizer.chat_template:
        raise DistillError("export: the tokenizer has no chat template; set model.chat_template")
    param = next(adapted.parameters())
    dtype, device = param.dtype, param.device
    del param
    expected = _answers(adapted, tokenizer, conversations, max_new_tokens)
    # The distributions that chose each reference token (and the stop after them), teacher-forced.
    logprobs = [answer_logprobs(adapted, tokenizer, c, generated_ids(e)) for c, e in zip(conversations, expected)]
    with adapted.disable_adapter():  # what the adapter itself moves: the scale a wrong merge is read against
        effect = max(
            (
                float((answer_logprobs(adapted, tokenizer, c, generated_ids(e)) - ref).abs().max())
                for c, e, ref in zip(conversations, expected, logprobs)
            ),
            default=0.0,
        )
    merged = adapted.merge_and_unload()
    set_generation_eos(merged.generation_config, tokenizer)
    if save_dtype is not None:
        merged.to(save_dtype)
    merged.save_pretrained(out / EXPORT_MERGED, safe_serialization=True)
    tokenizer.save_pretrained(out / EXPORT_MERGED)
    return Reference(expected, logprobs, effect, dtype, device)


def generated_ids(answer: Completion) -> list[int]:
    """A generated answer's token ids, which generate_batch records for every answer."""
    assert answer.token_ids is not None, f"an answer from {answer.source} without its token ids"
    return answer.token_ids


def answer_logprobs(model, tokenizer, conversation: list[dict], answer_ids: list[int]):
    """log-softmax (fp32, on the CPU) of the next-token distributions at each of `answer_ids`'
    positions and the one after them, with the prompt tokenized as generation tokenizes it."""
    import torch

    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + list(answer_ids)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=len(answer_ids) + 1).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


_MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def set_generation_eos(generation_config, tokenizer) -> None:
    """The tokenizer's EOS (what the chat template ends a turn with, what training taught)
    must stop generation; any other stop ids the base had are kept after it."""
    eos = tokenizer.eos_token_id
    current = generation_config.eos_token_id
    ids = list(current) if isinstance(current, (list, tuple)) else ([] if current is None else [current])
    generation_config.eos_token_id = eos if ids in ([], [eos]) else [eos, *[i for i in ids if i != eos]]
    generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation_config.bos_token_id = tokenizer.bos_token_id


def _answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[Completion]:
    from pipeline.llm.generate import generate_batch

    return generate_batch(model, tokenizer, conversations, max_new_tokens)


def reload_plain(folder: Path, dtype=None, device="cpu"):
    """Load with nothing but transformers, as a user of the exported model would: straight onto
    `device` (a GPU's weights never pass through host RAM)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype or torch.float32, device_map={"": str(device)}
    ).eval()


def base_dtype(folder: str):
    """The dtype the base's config.json declares (None when it declares none)."""
    import torch
    from transformers import AutoConfig

    with hub_access(folder, "model.base"):
        declared = getattr(AutoConfig.from_pretrained(folder), "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else None
