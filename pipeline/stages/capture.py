"""Capture: run the prompts through the teacher and record its answers as labels.

    distill capture RECIPE                                  (make distill runs it first)
    distill capture RECIPE teacher.spec=openai:gpt-4o-mini teacher.budget_usd=5
    distill capture RECIPE teacher.spec=logs:exports/chat.jsonl
    distill capture RECIPE capture.records=runs/x/rounds/r1/gather/gathered.jsonl   (what retrain does)
    distill capture RECIPE teacher.spec=openai:gpt-4o-mini teacher.mode=batch [--no-wait]   (half price)

Writes `teacher.jsonl`: one capture record per prompt and sample, in prompt order: the
conversation as the app sends it (a prompts file's row is one user turn; a row with `messages`
is that conversation) and the teacher's answer as the last assistant turn. The teacher is shown
the task file's instructions and worked examples first when the conversation has no system
prompt of its own (`Task.teacher_messages`); the record holds what the app sent, not that prefix.
The teacher is asked through the teacher service (pipeline/teachers/service.py): every
answer is committed to the SQLite cache the moment it arrives (per batch for the local
teacher), so an interrupted or budget-stopped capture resumes without paying twice. With
`teacher.mode=batch` the uncached prompts first go through provider batches
(pipeline/teachers/batch.py), whose answers land in the same cache; the service then finds
them there and buys synchronously only the few requests a batch failed.

Exits non-zero (DistillError) when the budget stops it before every prompt is answered,
when more than `teacher.max_failure_rate` of calls fail after retries, or on a 401/403.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.artifacts import CAPTURE_RECORDS, Manifest, sha256_json, write_jsonl
from pipeline.config import CaptureConfig, Recipe, TeacherConfig
from pipeline.conversation import (
    Unsupported,
    check_conversation,
    read_messages,
    skipped_lines,
    split_answer,
    user_turn,
)
from pipeline.curation.records import example_weight
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion
from pipeline.llm.loading import check_recipe_models
from pipeline.task import Task, load_task
from pipeline.teachers import parse_spec
from pipeline.teachers.batch import BatchReport, record_meta, run_batches
from pipeline.teachers.logs import import_logs, log_files
from pipeline.teachers.registry import content_files
from pipeline.teachers.service import ServiceReport, TeacherService
from pipeline.teachers.sources import is_table_file, read_rows

log = logging.getLogger(__name__)

NAME = "capture"
# What changes the answers; not where they are cached, nor how fast or how often they are asked.
READS: tuple[str, ...] = (
    "teacher.spec",
    "teacher.max_new_tokens",
    "teacher.temperature",
    "teacher.n",
    "teacher.few_shot",
    "teacher.constrain_to_labels",
    "teacher.constrain_to_schema",
    "teacher.label_distribution",
    "teacher.base_url",
    "teacher.logprobs",
    "teacher.prompt_col",
    "teacher.label_col",
    "capture.prompts",
    "capture.prompts_split",
    "capture.prompt_field",
    "capture.gold_field",
    "capture.limit",
    "capture.records",
)
UPSTREAM: tuple[str, ...] = ()
RESUMABLE = False  # the teacher cache is its resume point
ALL_RANKS = False
SYSTEM_METRICS = False
OUTPUT = CAPTURE_RECORDS


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    provider, ref = parse_spec(recipe.teacher.spec)
    files = {"task": recipe.capture.task}
    if recipe.capture.records is not None:  # answers already recorded: no teacher, no prompts file
        return files | {"records": recipe.capture.records}
    # A local model folder's content, not its path: retrained in place, it re-captures.
    files |= {f"teacher_model/{name}": path for name, path in content_files(recipe.teacher.spec).items()}
    if provider == "logs":
        logs = log_files(ref)  # one file, or an OpenAI Batch input+output pair
        if len(logs) == 2:
            files |= {"logs": logs[0], "logs_pair": logs[1]}
        elif is_table_file(logs[0]):  # a hub id or dataset folder is named by the spec, which the fingerprint covers
            files["logs"] = logs[0]
    elif is_table_file(recipe.capture.prompts):
        files["prompts"] = recipe.capture.prompts
    # Otherwise a dataset folder or hub id: the recipe names it, which the fingerprint covers.
    return files


@dataclass
class Entry:
    """One output record to be: a prompt, which sample of it, and what the teacher is shown."""

    prompt: dict
    sample: int
    messages: list[dict]


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    check_recipe_models(recipe)  # later stages load them: a typo fails now, not after the bill
    if "records" in inputs:
        return run_records(inputs["records"], out, tracker)
    provider, ref = parse_spec(recipe.teacher.spec)
    if provider == "logs":  # not a teacher: answers to import (the spec names the files, a folder or a hub id)
        return run_logs(recipe, ref, out, tracker)
    task = load_task(inputs["task"])
    prompts, skipped = load_prompts(inputs.get("prompts", recipe.capture.prompts), recipe.capture)
    service = TeacherService.for_task(recipe.teacher, recipe.capture.cache, task, progress="capture")
    entries = _entries(prompts, task, recipe.teacher)
    conversations, samples = [e.messages for e in entries], [e.sample for e in entries]
    batch = None
    try:
        if recipe.teacher.mode == "batch":
            batch = run_batches(service, recipe.teacher, conversations, samples)
            _check_batches(batch, service, conversations, samples, recipe.teacher)
        completions = service.answer_sync(conversations, samples)
        report = service.report
        if not report.budget_stop:
            extra = record_meta(service, conversations, samples, completions) if batch else None
            _write_records(out / OUTPUT, entries, completions, service.teacher.spec, service.identity, recipe, extra)
    finally:
        service.close()
    manifest = _manifest(len(prompts), len(entries), report)
    _add_skipped(manifest, skipped)
    if batch is not None:
        _add_batch(manifest, batch)
    tracker.params(
        {
            "teacher": service.identity,
            "prompts": len(prompts),
            "samples_per_prompt": recipe.teacher.n,
            "price": asdict(service.price) if service.price else {},
            **({"batch_price": asdict(batch.price) if batch.price else {}} if batch else {}),
        }
    )
    tracker.metrics({**manifest.counts, **manifest.metrics, "cost_usd": manifest.cost_usd})
    _check(report, completions, len(entries), recipe.teacher)
    log.info("capture: %s", "; ".join(manifest.notes[: 2 if batch else 1]))
    return manifest


# ---------------------------------------------------------------- prompts


def load_prompts(source: Path | str, cfg: CaptureConfig) -> tuple[list[dict], Counter]:
    """Read the prompts: each record is a conversation (`messages`, ending with a user turn) or
    has a non-empty `cfg.prompt_field` (one user turn). Ids default to row order. Conversations
    with content the pipeline cannot train on are skipped and counted per kind (returned)."""
    prompts: list[dict] = []
    skipped: Counter[str] = Counter()
    for n, (where, rec) in enumerate(read_rows(source, cfg.prompts_split), start=1):
        try:
            messages = _prompt_conversation(where, rec, cfg.prompt_field)
        except Unsupported as err:
            skipped[err.kind] += 1
            continue
        prompts.append({**rec, "messages": messages, "id": str(rec.get("id") or f"p{n:06d}")})
        if cfg.limit and len(prompts) >= cfg.limit:
            break
    if not prompts:
        raise DistillError(f"{source}: no prompts" + "".join(f"; {line}" for line in skipped_lines(skipped)))
    return prompts, skipped


def _prompt_conversation(where: str, rec: dict, prompt_field: str) -> list[dict]:
    if rec.get("messages") is not None:
        try:
            messages = read_messages(rec["messages"])
            check_conversation(messages)
        except Unsupported:
            raise
        except ValueError as err:
            raise DistillError(f"{where}: messages: {err}") from None
        return messages
    text = rec.get(prompt_field)
    if not isinstance(text, str) or not text.strip():
        raise DistillError(
            f"{where}: no '{prompt_field}' text (set capture.prompt_field to the right column, "
            "or give each row a `messages` conversation)"
        )
    return user_turn(text)


def _add_skipped(manifest: Manifest, skipped: Counter) -> None:
    """Content the pipeline cannot train on yet: counted per kind and said, never dropped silently."""
    for kind, n in sorted(skipped.items()):
        manifest.counts[f"skipped_{kind.replace(' ', '_')}"] = n
    for line in skipped_lines(skipped):
        manifest.notes.append(line)
        log.warning("capture: %s", line)


# ---------------------------------------------------------------- records


def _entries(prompts: list[dict], task: Task, cfg: TeacherConfig) -> list[Entry]:
    entries = []
    for prompt in prompts:
        messages = task.teacher_messages(prompt["messages"], cfg.few_shot)
        entries += [Entry(prompt, s, messages) for s in range(cfg.n)]
    return entries


def _write_records(
    path: Path,
    entries: list[Entry],
    completions: list[Completion],
    spec: str,
    identity: dict,
    recipe: Recipe,
    extra: list[dict] | None = None,
) -> None:
    """Write records in prompt order to a temp file, then rename: a reader never sees a
    half-written teacher.jsonl. `extra`: meta to add per record (batch answers: provenance and
    what they would have cost as sync calls, for the card's savings line)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (e, completion) in enumerate(zip(entries, completions, strict=True)):
            record = make_record(
                e.prompt,
                completion,
                spec,
                identity,
                "capture",
                recipe.capture.gold_field,
                request=_sent(recipe.teacher),
                sample=e.sample,
                n=recipe.teacher.n,
            )
            record["meta"] |= extra[i] if extra else {}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sent(cfg: TeacherConfig) -> dict:
    """meta.request of a captured answer: the parameters capture asked the teacher with."""
    return {"max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}


def make_record(
    prompt: dict,
    completion: Completion,
    spec: str,
    identity: dict,
    source: str,
    gold_field: str | None,
    request: dict | None = None,
    sample: int = 0,
    n: int = 1,
) -> dict:
    """The capture record: `prompt["messages"]` (the conversation as sent) with the answer appended."""
    conversation = prompt["messages"]
    meta = {
        "teacher": spec,
        "params": identity,
        "source": source,
        "request": request or {},
        "prompt_sha": sha256_json(conversation)[:16],
        "sample": sample,
        "cost_usd": completion.cost_usd,
        "latency_ms": completion.latency_ms,
        "usage": completion.usage,
        "logprobs": completion.mean_logprob,  # the mean: curate's confidence filter reads it
        "token_logprobs": completion.token_logprobs,  # per token: evaluate's and the router's signals
        "label_logprobs": completion.label_logprobs,  # each label's log-likelihood: the soft labels' source
        "finish_reason": completion.finish_reason,
        "error": completion.error,
        "created_at": completion.created_at,
    }
    if gold_field and prompt.get(gold_field) is not None:
        meta["gold"] = prompt[gold_field]
    return {
        "id": prompt["id"] if n == 1 else f"{prompt['id']}#{sample}",
        "messages": [*conversation, {"role": "assistant", "content": completion.text}],
        "meta": meta,
    }


# ---------------------------------------------------------------- accounting


def _manifest(prompts: int, records: int, report: ServiceReport) -> Manifest:
    counts = {
        "prompts": prompts,
        "records": records,
        "cache_hits": report.cache_hits,
        "teacher_calls": report.calls,
        "ok": report.ok,
        "failed": report.failed,
        "retries": report.retries,
        "not_sent": report.not_sent,
    }
    metrics: dict[str, float | None] = {}
    if report.metered:
        counts |= {"prompt_tokens": report.prompt_tokens, "completion_tokens": report.completion_tokens}
        metrics["cost_usd_prompt_set"] = report.total_usd
    # What this run paid: cached answers are free.
    notes = [
        f"{report.ok} ok / {report.failed} failed of {report.calls} calls, {report.cache_hits} cached, "
        f"${report.spent_usd:.4f} this run"
    ]
    return Manifest(stage=NAME, counts=counts, metrics=metrics, cost_usd=report.spent_usd, notes=notes + report.notes)


def _check_batches(
    batch: BatchReport, service: TeacherService, conversations: list[list[dict]], samples: list[int], cfg: TeacherConfig
) -> None:
    """Before any sync call: what the batches could not answer is bought synchronously only when
    it is a few failed requests; a budget stop, a cancelled batch or many failures end the stage
    (everything imported is cached; a rerun submits the rest as a follow-up batch)."""
    if batch.budget_stop:
        raise DistillError(
            f"budget reached: {batch.not_sent} prompts were not submitted, their worst case at the batch price "
            f"would cross teacher.budget_usd=${cfg.budget_usd:.4f} (cached answers and running batches count); "
            "what was answered is cached: rerun with a higher teacher.budget_usd to continue."
        )
    if batch.cancelled:
        raise DistillError(
            f"batch {', '.join(batch.cancelled)} was cancelled; its {batch.imported} answers are "
            "cached, rerun `distill capture` to submit the rest"
        )
    keys = service.keys(conversations, samples)
    missing = set(keys) - set(service.cache.costs(keys))
    unanswered = missing - set(batch.failed)
    if unanswered:
        raise DistillError(
            f"{len(unanswered)} requests were not run by their batches (expired {1 + len(batch.batches)} "
            "times?); what finished is cached, rerun `distill capture` to submit the rest"
        )
    tried = batch.imported + len(batch.failed)
    if batch.failed and len(batch.failed) / tried > cfg.max_failure_rate:
        first = next(iter(batch.failed.values()))
        raise DistillError(
            f"{len(batch.failed)} of {tried} batch requests failed ({len(batch.failed) / tried:.1%} > "
            f"teacher.max_failure_rate={cfg.max_failure_rate:.1%}), too many to retry as sync calls; the "
            f"answers are cached, rerun to submit the rest as a follow-up batch. First error: {first}"
        )
    if batch.failed:
        log.info("batch: retrying the %d failed requests as sync calls", len(batch.failed))


def _add_batch(manifest: Manifest, batch: BatchReport) -> None:
    """The batch side of the bill: what this run's batch answers cost, and what they saved."""
    manifest.counts |= {
        "batches": len(batch.batches),
        "batch_submitted": batch.submitted,
        "batch_imported": batch.imported,
        "batch_failed": len(batch.failed),
        "batch_lost": batch.lost,
    }
    manifest.metrics |= {
        "batch_cost_usd": batch.cost_usd,
        "batch_sync_cost_usd": batch.sync_cost_usd,
        "batch_saved_usd": batch.saved_usd,
    }
    manifest.cost_usd += batch.cost_usd
    p = batch.price
    price = (
        f"batch price ${p.input_per_mtok}/${p.output_per_mtok} per 1M tokens in/out ({p.source})" if p else "unpriced"
    )
    manifest.notes.insert(
        1,
        f"{batch.imported} answers from {len(batch.batches)} provider batch(es): "
        f"${batch.cost_usd:.4f} at the batch price, ${batch.sync_cost_usd:.4f} at sync prices "
        f"(saved ${batch.saved_usd:.4f}); {price}",
    )


def _check(report: ServiceReport, completions: list[Completion], records: int, cfg: TeacherConfig) -> None:
    """Budget stop and too many failures end the stage after everything bought is cached."""
    if report.budget_stop:
        answered = records - report.not_sent - report.failed
        raise DistillError(
            f"budget reached: teacher.budget_usd=${cfg.budget_usd:.4f}, ${report.total_usd:.4f} spent on this "
            f"prompt set (${report.spent_usd:.4f} this run); {answered}/{records} answers bought, "
            f"{report.not_sent} not sent. They are cached: rerun with a higher teacher.budget_usd to continue."
        )
    if report.calls and report.failed / report.calls > cfg.max_failure_rate:
        first = next(c.error for c in completions if c.error)
        raise DistillError(
            f"{report.failed} of {report.calls} teacher calls failed after retries "
            f"({report.failed / report.calls:.1%} > teacher.max_failure_rate={cfg.max_failure_rate:.1%}); "
            f"the {report.ok} answers are cached, rerun to retry the rest. First error: {first}"
        )


# ---------------------------------------------------------------- logs:


def run_logs(recipe: Recipe, ref: str, out: Path, tracker) -> Manifest:
    """Import existing answers: no teacher calls, no cost."""
    imported = import_logs(ref, recipe.teacher.prompt_col, recipe.teacher.label_col, recipe.capture.prompts_split)
    rows = imported.records[: recipe.capture.limit] if recipe.capture.limit else imported.records
    spec = recipe.teacher.spec
    identity = {"provider": "logs", "path": ref}
    records = [
        make_record(
            {**r.row, "id": r.id, "messages": r.messages},
            Completion(text=r.answer, source=spec),
            spec,
            identity,
            "logs",
            recipe.capture.gold_field,
            request=r.request,
        )
        for r in rows
    ]
    write_jsonl(out / OUTPUT, records)
    notes = [f"imported {len(records)} records from {ref}"]
    if imported.rejected:
        notes.append(imported.rejected_summary())
        log.warning("%s", imported.rejected_summary())
    counts = {
        "prompts": len(records),
        "records": len(records),
        "cache_hits": 0,
        "teacher_calls": 0,
        "rejected": len(imported.rejected),
    }
    manifest = Manifest(stage=NAME, counts=counts, notes=notes)
    _add_skipped(manifest, imported.unsupported)
    tracker.params({"teacher": identity, "prompts": len(records)})
    tracker.metrics(manifest.counts)
    return manifest


# ---------------------------------------------------------------- capture.records


def run_records(path: Path, out: Path, tracker) -> Manifest:
    """Take capture records as they are (meta kept: gold, teacher, logprobs); no teacher, no cost."""
    records = [check_record(where, row) for where, row in read_rows(path)]
    if not records:
        raise DistillError(f"{path}: no capture records")
    seen: dict[str, str] = {}
    for where, record in records:
        if record["id"] in seen:
            raise DistillError(f"{where}: id '{record['id']}' already used at {seen[record['id']]}")
        seen[record["id"]] = where
    write_jsonl(out / OUTPUT, [r for _, r in records])
    counts = {"prompts": len(records), "records": len(records), "cache_hits": 0, "teacher_calls": 0}
    tracker.metrics(counts)
    return Manifest(stage=NAME, counts=counts, notes=[f"took {len(records)} recorded answers from {path}"])


def check_record(where: str, row: dict) -> tuple[str, dict]:
    """A capture record: an id, text messages ending with a user turn and the answer, a meta mapping."""
    try:
        if not isinstance(row.get("id"), str) or not isinstance(row.get("meta", {}), dict):
            raise ValueError("want an id and a meta mapping")
        messages = read_messages(row.get("messages"))
        split_answer(messages)
        example_weight(row.get("meta", {}))
    except ValueError as err:
        raise DistillError(
            f"{where}: not a capture record ({err}; want id, messages [..., user, assistant], meta)"
        ) from None
    return where, {"id": row["id"], "messages": messages, "meta": row.get("meta", {})}
