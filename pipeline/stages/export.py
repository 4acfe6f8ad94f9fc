"""Export: write each format in `export.formats` (pipeline/export/), re-check every artifact, publish.

    distill export RECIPE [export.formats=[merged,adapter,gguf]]

merged/ (safetensors in the base's dtype, tokenizer, chat template, generation config): the
adapter merged into an unquantized base, reloaded with plain transformers in the compute dtype
on the compute device and compared with base + adapter on validation prompts: next-token
log-probabilities within `export.verify_logprob_tolerance` and greedy answers alike on at least
`export.verify_min_agreement` of them, else the stage fails (verification.json, and the stage's
merged_verify_* metrics). adapter/: the PEFT adapter alone. gguf/: llama.cpp files of `export.gguf_types` and an Ollama Modelfile.

Then parity: every artifact answers the test split again in its own runtime and is scored
against the teacher (parity.json, parity.md); F16 must reproduce merged's tokens exactly, the
quantized files must stay within `export.parity_tolerance` of merged's agreement. A rejected
artifact is kept for inspection, named in the stage's notes and not registered; the stage fails
only when `export.require` names it. README.md (the model card) is written last, and accepted
artifacts are registered in the MLflow model registry with their lineage.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.artifacts import (
    CURATED_DATASET,
    EVAL_POLICY,
    EVAL_REPORT,
    EXPORT_MERGED,
    FINETUNE_ADAPTER,
    Manifest,
    atomic_write_json,
    atomic_write_text,
    read_manifest,
    sha256_file,
    sha256_json,
)
from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.task import Task, load_task

log = logging.getLogger(__name__)

NAME = "export"
READS = ("name", "model.base", "export")
# evaluate: its report.json is the model card's evaluation headline, its policy part of the lineage.
UPSTREAM = ("curate", "finetune", "evaluate")
RESUMABLE = False
ALL_RANKS = False
SYSTEM_METRICS = False
MODEL_CARD = "README.md"


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    return {"task": recipe.capture.task}


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from datasets import load_from_disk

    from pipeline.export.parity import PARITY_JSON, PARITY_MD, table_json, table_markdown

    cfg = recipe.export
    if "gguf" in cfg.formats:
        from pipeline.export.converter import installed_llama_cpp

        installed_llama_cpp()  # before minutes of merging: the gguf extra must be there
    task = load_task(inputs["task"])
    dataset = load_from_disk(str(inputs["curate"] / CURATED_DATASET), keep_in_memory=True)
    verify = [Task.student_messages(r["prompt"]) for r in list(dataset["validation"])[: cfg.verify_prompts]]
    test = list(dataset["test"])[: cfg.parity_limit]
    if not test:
        raise DistillError("export: the test split is empty, so no artifact can be re-scored")
    rows, counts, modelfile, verify_figures = build_artifacts(recipe, inputs, out, verify, test, task)
    tracker.metrics(verify_figures)

    meta = {"test_examples": len(test), "tolerance": cfg.parity_tolerance, "batch_size": cfg.batch_size,
            "verify_prompts": len(verify), "max_new_tokens": cfg.parity_max_new_tokens}
    parity_md = table_markdown(rows, meta)
    atomic_write_json(out / PARITY_JSON, table_json(rows, meta))
    atomic_write_text(out / PARITY_MD, parity_md)
    atomic_write_text(out / MODEL_CARD, _card(recipe, inputs, rows, parity_md, modelfile))
    log_parity(tracker, rows, out)
    notes = [f"{r.artifact} rejected: {'; '.join(r.reasons)}" for r in rows if r.status == "rejected"]
    for note in notes:
        log.warning("export: %s", note)
    check_required(rows, cfg.require, out / PARITY_MD)
    versions = register(recipe, inputs, out, rows, tracker) if cfg.registry else {}
    counts["registered_versions"] = len(versions)
    metrics = {**verify_figures, **{f"{r.artifact}_agreement": r.agreement["value"] for r in rows if r.agreement}}
    return Manifest(stage=NAME, counts=counts, metrics=metrics, notes=notes)


def check_required(rows, require: list[str], table: Path) -> None:
    """`export.require`: a rejected artifact listed there fails the stage (the table stays behind)."""
    failed = [r for r in rows if r.status == "rejected" and r.artifact in require]
    if failed:
        raise DistillError(f"export: required artifact {failed[0].artifact} rejected: {'; '.join(failed[0].reasons)} "
                           f"(table: {table})")


def build_artifacts(recipe: Recipe, inputs: dict[str, Path], out: Path, verify, test, task):
    """Write every format and score it; returns the parity rows, counts and the Modelfile (or None)."""
    import torch
    from peft import PeftModel

    from pipeline.export.adapter import export_adapter
    from pipeline.export.merged import base_dtype, export_merged
    from pipeline.export.parity import ArtifactParity, forced_references, hf_answers, score
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer, resolve_model

    cfg = recipe.export
    source = inputs["finetune"] / FINETUNE_ADAPTER
    tokenizer = load_tokenizer(str(source))
    rows: list[ArtifactParity] = []
    adapter = export_adapter(source, out) if "adapter" in cfg.formats else source
    # Merging needs an unquantized base, whatever training used; the adapter is read from the
    # exported copy, so the files shipped are the ones verified.
    adapted = PeftModel.from_pretrained(load_model(recipe.model.base, device_plan()), str(adapter)).eval()
    merged = export_merged(adapted, tokenizer, verify, cfg.verify_max_new_tokens, out,
                           base_dtype(resolve_model(recipe.model.base)), cfg.verify_logprob_tolerance,
                           cfg.verify_min_agreement)
    del adapted
    convs = [Task.student_messages(r["prompt"]) for r in test]
    test_references = [r["completion"] for r in test]
    merged_row = ArtifactParity("merged", EXPORT_MERGED, _size(out / EXPORT_MERGED), runtime="transformers",
                                verify_max_logprob_delta=merged.max_logprob_delta,
                                verify_logprob_tolerance=merged.logprob_tolerance)
    score(merged_row, hf_answers(merged.model, tokenizer, convs, cfg.parity_max_new_tokens, cfg.batch_size,
                                 merged.load_s), test_references, task)
    merged_row.delta_vs_merged = 0.0
    rows.append(merged_row)
    if "adapter" in cfg.formats:
        rows.append(ArtifactParity("adapter", adapter.name, _size(adapter), runtime="transformers+peft",
                                   verify_max_logprob_delta=merged.max_logprob_delta,
                                   verify_logprob_tolerance=merged.logprob_tolerance,
                                   note=f"base + this adapter gave merged's greedy tokens on "
                                        f"{merged.greedy_agreement:.0%} of {len(verify)} verification prompts, "
                                        f"log-probabilities within {merged.max_logprob_delta:.2g} nats; "
                                        "its agreement is merged's"))
    reference_model = merged.model
    if next(merged.model.parameters()).dtype != torch.float32:
        # F16 is held to fp32 log-probabilities: bf16's 8-bit mantissa is coarser than F16's.
        from pipeline.export.merged import reload_plain

        reference_model = reload_plain(out / EXPORT_MERGED)
    references = (forced_references(reference_model, tokenizer, verify, cfg.verify_max_new_tokens)
                  if "gguf" in cfg.formats else [])
    del reference_model
    verify_figures = {"merged_verify_max_logprob_delta": merged.max_logprob_delta,
                      "merged_verify_logprob_tolerance": merged.logprob_tolerance,
                      "merged_verify_greedy_agreement": merged.greedy_agreement}
    del merged
    counts = {"verified_prompts": len(verify), "parity_test_examples": len(test)}
    modelfile = None
    if "gguf" in cfg.formats:
        gguf_rows, modelfile = build_gguf(recipe, out, tokenizer, verify, references, convs, test_references, task,
                                          merged_row)
        rows += gguf_rows
    counts["accepted"] = sum(r.status == "accepted" for r in rows)
    counts["rejected"] = sum(r.status == "rejected" for r in rows)
    return rows, counts, modelfile, verify_figures


def build_gguf(recipe: Recipe, out: Path, tokenizer, verify, references, convs, test_references, task, merged_row):
    """Convert and quantize, check each file, score it in llama.cpp; write the Modelfile. A file
    this llama.cpp cannot decode on this machine is rejected with the reason; the rest go on."""
    from pipeline.artifacts import EXPORT_GGUF
    from pipeline.export.gguf import export_gguf, gguf_metadata
    from pipeline.gguf_types import REFERENCE_TYPE
    from pipeline.export.modelfile import MODELFILE, infer_chat_format, modelfile_text, stop_strings
    from pipeline.export.parity import (ArtifactParity, check_reference_type, gguf_answers, gguf_problems, judge,
                                        score)
    from pipeline.llm.gguf_runtime import GgufModel, GgufUnusable
    from pipeline.llm.loading import cache_root

    cfg = recipe.export
    files = export_gguf(out / EXPORT_MERGED, cfg.gguf_types, out, cache_root())
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in [*verify, *convs]]
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    n_ctx = longest + max(cfg.parity_max_new_tokens, cfg.verify_max_new_tokens) + 16
    rows = []
    for f in files:
        row = ArtifactParity(f"gguf-{f.type}", str(f.path.relative_to(out)), f.size_bytes, runtime="llama.cpp",
                             bits_per_weight=f.bits_per_weight, tensor_types=f.tensor_types)
        rows.append(row)
        try:
            model = GgufModel(f.path, n_ctx)
        except GgufUnusable as e:
            row.reject(str(e))
            continue
        try:
            for problem in gguf_problems(model, gguf_metadata(model.llm), tokenizer, verify):
                row.reject(problem)
            if f.type == REFERENCE_TYPE:
                check_reference_type(row, model, references, cfg.f16_logprob_tolerance)
            score(row, gguf_answers(model, convs, cfg.parity_max_new_tokens), test_references, task)
        finally:
            model.close()
        judge(row, merged_row, cfg.parity_tolerance)
    accepted = sorted((r for r in rows if r.status == "accepted"), key=lambda r: r.size_bytes)
    if not accepted:
        return rows, None
    fmt = infer_chat_format(tokenizer, verify)
    text = modelfile_text(Path(accepted[0].path).name, fmt, stop_strings(fmt, tokenizer))
    atomic_write_text(out / EXPORT_GGUF / MODELFILE, text)
    return rows, text


def log_parity(tracker, rows, out: Path) -> None:
    from pipeline.export.parity import PARITY_JSON, PARITY_MD

    figures = {}
    for r in rows:
        for key in ("tokens_per_s", "load_s", "eos_stop_rate", "delta_vs_merged", "bits_per_weight"):
            if getattr(r, key) is not None:
                figures[f"{r.artifact}_{key}"] = getattr(r, key)
        if r.agreement:
            figures[f"{r.artifact}_agreement"] = r.agreement["value"]
        figures[f"{r.artifact}_accepted"] = float(r.status == "accepted")
    tracker.metrics(figures)
    for name in (PARITY_JSON, PARITY_MD, MODEL_CARD, "verification.json"):
        if (out / name).is_file():
            tracker.artifact(out / name)


def register(recipe: Recipe, inputs: dict[str, Path], out: Path, rows, tracker) -> dict[str, str]:
    from pipeline.export.registry import lineage_tags, register_accepted

    hashes = {"dataset": sha256_json(read_manifest(inputs["curate"]).outputs),
              "adapter": sha256_json(read_manifest(inputs["finetune"]).outputs)}
    if (inputs["evaluate"] / EVAL_POLICY).is_file():
        hashes["policy"] = sha256_file(inputs["evaluate"] / EVAL_POLICY)
    # The runner renames this partial folder to runs/<recipe>/export once the stage returns;
    # the registry points at where the artifacts will then live.
    final = out.parent / NAME
    return register_accepted(tracker, recipe.export.model_name or recipe.name, rows, final,
                             lineage_tags(recipe.name, hashes))


def _card(recipe: Recipe, inputs: dict[str, Path], rows, parity_md: str, modelfile: str | None) -> str:
    import json

    from pipeline.export.card import render_card

    card = inputs["curate"] / "card.md"
    report = inputs["evaluate"] / EVAL_REPORT
    return render_card(recipe, rows, parity_md, card.read_text() if card.is_file() else None,
                       json.loads(report.read_text()) if report.is_file() else None, modelfile)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
