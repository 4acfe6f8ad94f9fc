"""Export: write each format in `export.formats` (pipeline/export/), each re-checked.

    distill export RECIPE

`merged/` (safetensors, tokenizer, chat template): the adapter merged into an unquantized
base, reloaded with plain `transformers`, and required to give the same greedy answers as
base + adapter on validation prompts, else the stage fails.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import CURATED_DATASET, FINETUNE_ADAPTER, Manifest
from pipeline.config import Recipe
from pipeline.task import Task

NAME = "export"
READS = ("model.base", "export")
UPSTREAM = ("curate", "finetune")
RESUMABLE = False
SYSTEM_METRICS = False


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    return {}


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from datasets import load_from_disk
    from peft import PeftModel

    from pipeline.export import FORMATS
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    adapter = str(inputs["finetune"] / FINETUNE_ADAPTER)
    tokenizer = load_tokenizer(adapter)
    validation = load_from_disk(str(inputs["curate"] / CURATED_DATASET), keep_in_memory=True)["validation"]
    rows = list(validation)[: recipe.export.verify_prompts]
    conversations = [Task.student_messages(r["prompt"]) for r in rows]
    counts = {}
    for name in recipe.export.formats:
        # Merging needs an unquantized base, whatever training used: a fresh one per format.
        adapted = PeftModel.from_pretrained(load_model(recipe.model.base, device_plan()), adapter).eval()
        result = FORMATS[name](adapted, tokenizer, conversations, recipe.export.verify_max_new_tokens, out)
        counts[f"{name}_verified_prompts"] = result.verified_prompts
    tracker.metrics({"export_verified_prompts": len(conversations), "export_mismatches": 0})
    tracker.artifact(out / "verification.json")
    return Manifest(stage=NAME, counts={"verified_prompts": len(conversations), **counts})
