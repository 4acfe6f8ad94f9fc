"""The `merged` export: base + adapter merged into one plain transformers folder, re-checked.

    distill export RECIPE

The merge happens on an unquantized base (fp32 on CPU, bf16 on CUDA: never into 4-bit
weights, whatever training used), and the weights are saved in the base's own dtype with the
tokenizer, its chat template and a generation config whose EOS is the token training taught
the student to end on. The folder is reloaded with nothing but transformers: it must give
the same greedy tokens as base + adapter on the verification prompts, else the export fails.
It is the folder `vllm serve` and `AutoModelForCausalLM.from_pretrained` take.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import EXPORT_MERGED, atomic_write_json
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion


@dataclass(frozen=True)
class MergedExport:
    folder: str  # relative to the stage folder
    verified_prompts: int
    answers: list[Completion]  # the reloaded folder's greedy answers: the reference F16 must reproduce
    load_s: float
    model: object  # the reloaded merged model, for the parity run


def export_merged(adapted, tokenizer, conversations: list[list[dict]], max_new_tokens: int, out: Path,
                  save_dtype=None) -> MergedExport:
    """`adapted` is a PeftModel on an unquantized base; it is consumed by the merge.
    `save_dtype`: the base's dtype (None: keep the dtype it was merged in)."""
    if getattr(adapted, "is_loaded_in_4bit", False) or getattr(adapted, "is_loaded_in_8bit", False):
        raise DistillError("export: refusing to merge into a quantized base; load it unquantized")
    if not tokenizer.chat_template:
        raise DistillError("export: the tokenizer has no chat template; set model.chat_template")
    compute = next(adapted.parameters())
    expected = _answers(adapted, tokenizer, conversations, max_new_tokens)
    merged = adapted.merge_and_unload()
    set_generation_eos(merged.generation_config, tokenizer)
    if save_dtype is not None:
        merged.to(save_dtype)
    merged.save_pretrained(out / EXPORT_MERGED, safe_serialization=True)
    tokenizer.save_pretrained(out / EXPORT_MERGED)
    del merged

    import time

    start = time.perf_counter()
    reloaded = reload_plain(out / EXPORT_MERGED, compute.dtype, compute.device)
    load_s = time.perf_counter() - start
    got = _answers(reloaded, tokenizer, conversations, max_new_tokens)
    mismatches = [(c[-1]["content"], e, g) for c, e, g in zip(conversations, expected, got) if e.token_ids != g.token_ids]
    atomic_write_json(out / "verification.json",
                      {"prompts": len(conversations), "mismatches": len(mismatches),
                       "expected": [c.text for c in expected], "merged": [c.text for c in got]})
    if mismatches:
        prompt, e, g = mismatches[0]
        raise DistillError(f"export: merged model disagrees with base+adapter on '{prompt[:60]}': "
                           f"{e.text!r} vs {g.text!r}" + (f" (saved as {save_dtype})" if save_dtype else ""))
    return MergedExport(EXPORT_MERGED, len(conversations), got, load_s, reloaded)


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
    """Load with nothing but transformers, as a user of the exported model would."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return model.to(device).eval()


def base_dtype(folder: str):
    """The dtype the base's config.json declares (None when it declares none)."""
    import torch
    from transformers import AutoConfig

    declared = getattr(AutoConfig.from_pretrained(folder), "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else None
