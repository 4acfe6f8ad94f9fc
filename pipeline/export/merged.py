"""The `merged` export: base + adapter merged into one plain transformers folder, re-checked.

The merge happens on an unquantized base (whatever training used), and the saved folder is
reloaded with nothing but transformers: it must give the same greedy answers as base +
adapter on the verification prompts, else the export fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import EXPORT_MERGED, atomic_write_json
from pipeline.errors import DistillError


@dataclass(frozen=True)
class ExportResult:
    folder: str  # relative to the stage folder
    verified_prompts: int


def export_merged(adapted, tokenizer, conversations: list[list[dict]], max_new_tokens: int, out: Path) -> ExportResult:
    """`adapted` is a PeftModel on an unquantized base; it is consumed by the merge."""
    expected = _answers(adapted, tokenizer, conversations, max_new_tokens)
    merged = adapted.merge_and_unload()
    merged.save_pretrained(out / EXPORT_MERGED, safe_serialization=True)
    tokenizer.save_pretrained(out / EXPORT_MERGED)
    del merged

    got = _answers(reload_plain(out / EXPORT_MERGED), tokenizer, conversations, max_new_tokens)
    mismatches = [(c[-1]["content"], e, g) for c, e, g in zip(conversations, expected, got) if e != g]
    atomic_write_json(out / "verification.json",
                      {"prompts": len(conversations), "mismatches": len(mismatches), "expected": expected, "merged": got})
    if mismatches:
        prompt, e, g = mismatches[0]
        raise DistillError(f"export: merged model disagrees with base+adapter on '{prompt[:60]}': {e!r} vs {g!r}")
    return ExportResult(EXPORT_MERGED, len(conversations))


def _answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    from pipeline.llm.generate import generate_batch

    return [c.text for c in generate_batch(model, tokenizer, conversations, max_new_tokens)]


def reload_plain(folder: Path):
    """Load with nothing but transformers, as a user of the exported model would."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
