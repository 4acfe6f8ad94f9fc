"""Export: write each format in `export.formats` (pipeline/export/), re-check every artifact, publish.

    distill export RECIPE [export.formats=[merged,adapter,gguf]]

merged/ (safetensors in the base's dtype, tokenizer, chat template, generation config): the
adapter merged into an unquantized base, reloaded with plain transformers in the compute dtype
on the compute device and compared with base + adapter on validation prompts: next-token
log-probabilities within `export.verify_logprob_tolerance` and greedy answers alike on at least
`export.verify_min_agreement` of them, else the stage fails (verification.json, and the stage's
merged_verify_* metrics). adapter/: the PEFT adapter alone. gguf/: llama.cpp files of `export.gguf_types` and an Ollama Modelfile.

One copy of the model is in memory at a time (a bf16 7B is 13.5 GiB; an A10G has 22.5): base +
adapter are freed before the merged folder is reloaded, and the reloaded model is freed before
llama.cpp loads the GGUF files (onto the GPU where its build can). Before any of it, the disk the
formats need is compared with what is free.

Then parity: every artifact answers the first `export.parity_limit` test examples again in its own
runtime and is scored against the teacher (parity.json, parity.md); F16 is held to the reloaded merged
model's teacher-forced log-probabilities, in the dtype it ran in (`export.f16_logprob_tolerance`), the
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
    finished_manifest,
    sha256_file,
    sha256_json,
)
from pipeline.config import Recipe
from pipeline.conversation import conversation_of, read_student_view, student_messages
from pipeline.errors import DistillError
from pipeline.evaluation.metrics import extraction_figures
from pipeline.llm.answer import served_schema
from pipeline.task import load_task

log = logging.getLogger(__name__)

NAME = "export"
READS: tuple[str, ...] = ("name", "model.base", "export", "router.structured")
# evaluate: its report.json is the model card's evaluation headline, its policy part of the lineage.
UPSTREAM: tuple[str, ...] = ("curate", "finetune", "evaluate")
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
    shape = read_student_view(inputs["curate"]).shape
    verify = [student_messages(conversation_of(r), shape) for r in list(dataset["validation"])[: cfg.verify_prompts]]
    test = list(dataset["test"])[: cfg.parity_limit]
    if not test:
        raise DistillError("export: the test split is empty, so no artifact can be re-scored")
    convs = [student_messages(conversation_of(r), shape) for r in test]
    rows, counts, modelfile, verify_figures = build_artifacts(recipe, inputs, out, verify, test, convs, task)
    tracker.metrics(verify_figures)

    meta = {
        "test_examples": len(test),
        "tolerance": cfg.parity_tolerance,
        "batch_size": cfg.batch_size,
        "verify_prompts": len(verify),
        "max_new_tokens": cfg.parity_max_new_tokens,
    }
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
    return Manifest(stage=NAME, counts=counts, metrics=metrics, notes=notes, student_input=shape)


def check_required(rows, require: list[str], table: Path) -> None:
    """`export.require`: a rejected artifact listed there fails the stage (the table stays behind)."""
    failed = [r for r in rows if r.status == "rejected" and r.artifact in require]
    if failed:
        raise DistillError(
            f"export: required artifact {failed[0].artifact} rejected: {'; '.join(failed[0].reasons)} (table: {table})"
        )


def build_artifacts(recipe: Recipe, inputs: dict[str, Path], out: Path, verify, test, convs, task):
    """Write every format and score it on `convs` (the test rows as the student sees them); returns
    the parity rows, counts and the Modelfile (or None).
    One copy of the model is in memory at a time: base + adapter until the merged folder is saved,
    then the reloaded merged model until the GGUF files are checked (without it)."""
    from peft import PeftModel

    from pipeline.export.adapter import export_adapter
    from pipeline.export.merged import base_dtype, export_merged, f16_tolerance
    from pipeline.export.parity import ArtifactParity, forced_references, hf_answers, score
    from pipeline.llm.loading import device_plan, free_memory, load_model, load_tokenizer, resolve_model

    cfg = recipe.export
    source = inputs["finetune"] / FINETUNE_ADAPTER
    tokenizer = load_tokenizer(str(source))
    plan = device_plan()
    save_dtype = base_dtype(resolve_model(recipe.model.base))
    check_disk(out, disk_needed(recipe, plan, save_dtype))
    rows: list[ArtifactParity] = []
    adapter = export_adapter(source, out) if "adapter" in cfg.formats else source

    def load_adapted():
        # Merging needs an unquantized base, whatever training used; the adapter is read from the
        # exported copy, so the files shipped are the ones verified.
        return PeftModel.from_pretrained(load_model(recipe.model.base, plan), str(adapter)).eval()

    merged = export_merged(
        load_adapted,
        tokenizer,
        verify,
        cfg.verify_max_new_tokens,
        out,
        save_dtype,
        cfg.verify_logprob_tolerance,
        cfg.verify_min_agreement,
    )
    test_references = [r["completion"] for r in test]
    merged_row = ArtifactParity(
        "merged",
        EXPORT_MERGED,
        _size(out / EXPORT_MERGED),
        runtime="transformers",
        verify_max_logprob_delta=merged.max_logprob_delta,
        verify_logprob_tolerance=merged.logprob_tolerance,
    )
    schema = served_schema(recipe, task)
    merged_answers = hf_answers(
        merged.model, tokenizer, convs, cfg.parity_max_new_tokens, cfg.batch_size, merged.load_s, schema
    )
    score(merged_row, merged_answers, test_references, task)
    merged_texts = [c.text for c in merged_answers.completions]
    if schema is not None:
        score_structured(merged_row, merged_texts, merged_texts, schema)
        merged_row.field_f1_vs_merged = None  # the reference itself
    merged_row.delta_vs_merged = 0.0
    rows.append(merged_row)
    if "adapter" in cfg.formats:
        rows.append(
            ArtifactParity(
                "adapter",
                adapter.name,
                _size(adapter),
                runtime="transformers+peft",
                verify_max_logprob_delta=merged.max_logprob_delta,
                verify_logprob_tolerance=merged.logprob_tolerance,
                note=f"base + this adapter gave merged's greedy tokens on "
                f"{merged.greedy_agreement:.0%} of {len(verify)} verification prompts, "
                f"log-probabilities within {merged.max_logprob_delta:.2g} nats; "
                "its agreement is merged's",
            )
        )
    # F16 is held to the merged model as it runs here, in the compute dtype on the compute device
    # (a bf16 reference gets a bf16 tolerance); never a second, fp32 copy of the model on the host.
    compute_dtype = next(merged.model.parameters()).dtype
    references = (
        forced_references(merged.model, tokenizer, verify, cfg.verify_max_new_tokens) if "gguf" in cfg.formats else []
    )
    verify_figures = {
        "merged_verify_max_logprob_delta": merged.max_logprob_delta,
        "merged_verify_logprob_tolerance": merged.logprob_tolerance,
        "merged_verify_greedy_agreement": merged.greedy_agreement,
    }
    del merged
    free_memory()  # before llama.cpp loads the GGUF files (onto the GPU where its build can)
    counts = {"verified_prompts": len(verify), "parity_test_examples": len(test)}
    modelfile = None
    if "gguf" in cfg.formats:
        gguf_rows, modelfile = build_gguf(
            recipe,
            out,
            tokenizer,
            verify,
            references,
            convs,
            test_references,
            task,
            merged_row,
            merged_texts,
            f16_tolerance(cfg.f16_logprob_tolerance, compute_dtype),
        )
        rows += gguf_rows
    counts["accepted"] = sum(r.status == "accepted" for r in rows)
    counts["rejected"] = sum(r.status == "rejected" for r in rows)
    return rows, counts, modelfile, verify_figures


def disk_needed(recipe: Recipe, plan, save_dtype) -> dict[str, float]:
    """Bytes each export format will write, from the base's parameter count (empty when unknown)."""
    from pipeline.gguf_types import NOMINAL_BITS
    from pipeline.llm.loading import parameter_count

    params = parameter_count(recipe.model.base, recipe.model.architecture)
    if params is None:
        return {}
    dtype_bytes = (save_dtype or plan.dtype).itemsize
    needs = {f"merged ({_dtype_label(save_dtype or plan.dtype)})": params * dtype_bytes}
    if "gguf" in recipe.export.formats:
        needs |= {f"gguf {t}": params * NOMINAL_BITS[t] / 8 for t in recipe.export.gguf_types}
    return needs


def check_disk(out: Path, needs: dict[str, float], margin: float = 1.1) -> None:
    """Refuse before minutes of merging when the files cannot fit where they go."""
    import shutil

    total = sum(needs.values()) * margin
    free = shutil.disk_usage(out).free
    parts = ", ".join(f"{name} {size / 1e9:.1f} GB" for name, size in needs.items())
    if needs:
        log.info(
            "export: writes about %.1f GB (%s, +%d%%); %.1f GB free",
            total / 1e9,
            parts,
            round(100 * (margin - 1)),
            free / 1e9,
        )
    if total > free:
        raise DistillError(
            f"export: needs about {total / 1e9:.1f} GB of disk ({parts}, +{round(100 * (margin - 1))}%) "
            f"under {out}, but only {free / 1e9:.1f} GB is free; free some, or drop formats "
            "(export.formats, export.gguf_types)"
        )


def _dtype_label(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_gguf(
    recipe: Recipe,
    out: Path,
    tokenizer,
    verify,
    references,
    convs,
    test_references,
    task,
    merged_row,
    merged_texts: list[str],
    f16_tolerance: float,
):
    """Convert and quantize, check each file, score it in llama.cpp; write the Modelfile. A file
    this llama.cpp cannot decode on this machine is rejected with the reason; the rest go on."""
    from pipeline.artifacts import EXPORT_GGUF
    from pipeline.export.gguf import export_gguf, gguf_metadata
    from pipeline.export.modelfile import MODELFILE, infer_chat_format, modelfile_text, stop_strings
    from pipeline.export.parity import ArtifactParity, check_reference_type, gguf_answers, gguf_problems, judge, score
    from pipeline.gguf_types import REFERENCE_TYPE
    from pipeline.llm.gguf_runtime import GgufModel, GgufUnusable
    from pipeline.llm.loading import cache_root

    cfg = recipe.export
    schema = served_schema(recipe, task)
    files = export_gguf(out / EXPORT_MERGED, cfg.gguf_types, out, cache_root())
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in [*verify, *convs]]
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    n_ctx = longest + max(cfg.parity_max_new_tokens, cfg.verify_max_new_tokens) + 16
    rows = []
    for f in files:
        row = ArtifactParity(
            f"gguf-{f.type}",
            str(f.path.relative_to(out)),
            f.size_bytes,
            runtime="llama.cpp",
            bits_per_weight=f.bits_per_weight,
            tensor_types=f.tensor_types,
        )
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
                check_reference_type(row, model, references, f16_tolerance)
            answers = gguf_answers(model, convs, cfg.parity_max_new_tokens, schema)
            score(row, answers, test_references, task)
            if schema is not None:
                score_structured(row, [c.text for c in answers.completions], merged_texts, schema)
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


def score_structured(row, texts: list[str], merged_texts: list[str], schema: dict) -> None:
    """A parity row's schema-valid rate and field F1 against merged's answers (evaluate's metrics)."""
    found = extraction_figures(texts, merged_texts, schema, 1000, 0)
    row.schema_valid_rate = found["schema_valid_rate"].value
    row.field_f1_vs_merged = found["field_f1"].to_json()


def log_parity(tracker, rows, out: Path) -> None:
    from pipeline.export.parity import PARITY_JSON, PARITY_MD

    figures = {}
    for r in rows:
        for key in (
            "tokens_per_s",
            "load_s",
            "eos_stop_rate",
            "delta_vs_merged",
            "bits_per_weight",
            "schema_valid_rate",
        ):
            if getattr(r, key) is not None:
                figures[f"{r.artifact}_{key}"] = getattr(r, key)
        if r.agreement:
            figures[f"{r.artifact}_agreement"] = r.agreement["value"]
        if r.field_f1_vs_merged:
            figures[f"{r.artifact}_field_f1_vs_merged"] = r.field_f1_vs_merged["value"]
        figures[f"{r.artifact}_accepted"] = float(r.status == "accepted")
    tracker.metrics(figures)
    for name in (PARITY_JSON, PARITY_MD, MODEL_CARD, "verification.json"):
        if (out / name).is_file():
            tracker.artifact(out / name)


def register(recipe: Recipe, inputs: dict[str, Path], out: Path, rows, tracker) -> dict[str, str]:
    from pipeline.export.registry import lineage_tags, register_accepted

    hashes = {
        "dataset": sha256_json(finished_manifest(inputs["curate"]).outputs),
        "adapter": sha256_json(finished_manifest(inputs["finetune"]).outputs),
    }
    if (inputs["evaluate"] / EVAL_POLICY).is_file():
        hashes["policy"] = sha256_file(inputs["evaluate"] / EVAL_POLICY)
    # The runner renames this partial folder to runs/<recipe>/export once the stage returns;
    # the registry points at where the artifacts will then live.
    final = out.parent / NAME
    return register_accepted(
        tracker, recipe.export.model_name or recipe.name, rows, final, lineage_tags(recipe.name, hashes)
    )


def _card(recipe: Recipe, inputs: dict[str, Path], rows, parity_md: str, modelfile: str | None) -> str:
    import json

    from pipeline.export.card import render_card

    card = inputs["curate"] / "card.md"
    report = inputs["evaluate"] / EVAL_REPORT
    return render_card(
        recipe,
        rows,
        parity_md,
        card.read_text() if card.is_file() else None,
        json.loads(report.read_text()) if report.is_file() else None,
        modelfile,
    )


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
