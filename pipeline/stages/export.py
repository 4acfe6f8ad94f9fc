"""Export: merge the LoRA adapter into the base and save a plain transformers model.

    distill export RECIPE

Writes `merged/` (safetensors, tokenizer, chat template). The export is re-checked: the
merged folder is reloaded with plain `transformers` and must produce the same greedy
answers as base + adapter on validation prompts, else the stage fails.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import Manifest, atomic_write_json
from pipeline.config import Recipe
from pipeline.errors import DistillError

NAME = "export"
SECTIONS = ("model", "export")
UPSTREAM = ("curate", "finetune")


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    return {}


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from datasets import load_from_disk
    from peft import PeftModel

    from pipeline.models import device_plan, load_model, load_tokenizer

    plan = device_plan()  # merging needs an unquantized base, whatever training used
    tokenizer = load_tokenizer(str(inputs["finetune"] / "adapter"))
    adapted = PeftModel.from_pretrained(
        load_model(recipe.model.base, plan), str(inputs["finetune"] / "adapter")
    ).eval()
    rows = list(load_from_disk(str(inputs["curate"] / "dataset"), keep_in_memory=True)["validation"])[: recipe.export.verify_prompts]
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    expected = _answers(adapted, tokenizer, convs, recipe)

    merged = adapted.merge_and_unload()
    merged.save_pretrained(out / "merged", safe_serialization=True)
    tokenizer.save_pretrained(out / "merged")
    del merged, adapted

    reloaded = _reload_plain(out / "merged")
    got = _answers(reloaded, tokenizer, convs, recipe)
    mismatches = [(c[0]["content"], e, g) for c, e, g in zip(convs, expected, got) if e != g]
    verification = {"prompts": len(convs), "mismatches": len(mismatches), "expected": expected, "merged": got}
    atomic_write_json(out / "verification.json", verification)
    if mismatches:
        prompt, e, g = mismatches[0]
        raise DistillError(f"export: merged model disagrees with base+adapter on '{prompt[:60]}': {e!r} vs {g!r}")
    tracker.metrics({"export_verified_prompts": len(convs), "export_mismatches": 0})
    tracker.artifact(out / "verification.json")
    return Manifest(stage=NAME, counts={"verified_prompts": len(convs)})


def _answers(model, tokenizer, convs, recipe: Recipe) -> list[str]:
    from pipeline.models import generate_batch

    return [g.text for g in generate_batch(model, tokenizer, convs, recipe.export.verify_max_new_tokens)]


def _reload_plain(folder: Path):
    """Load with nothing but transformers, as a user of the exported model would."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
