"""Capture: run the prompts through the teacher and record its answers as labels.

    distill capture RECIPE                                  (make distill runs it first)
    distill capture RECIPE teacher.spec=openai:gpt-4o-mini teacher.budget_usd=5
    distill capture RECIPE teacher.spec=logs:exports/chat.jsonl

Writes `teacher.jsonl`: one chat-format example per prompt and sample, in prompt order.
Every answer is committed to the SQLite cache the moment it arrives (per batch for the
local teacher), and teacher.jsonl is rebuilt from the cache, so an interrupted or
budget-stopped capture resumes without paying the teacher twice.

Exits non-zero (DistillError) when the budget stops it before every prompt is answered,
when more than `teacher.max_failure_rate` of calls fail after retries, or on a 401/403.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.artifacts import Manifest, sha256_json, write_jsonl
from pipeline.config import CaptureConfig, Recipe, TeacherConfig
from pipeline.errors import DistillError
from pipeline.task import Task, load_task
from pipeline.teachers import Completion, build_teacher, parse_spec
from pipeline.teachers.cache import TeacherCache, cache_key
from pipeline.teachers.dispatch import Dispatcher, DispatchReport, Job, Limits
from pipeline.teachers.ledger import Ledger, Price, resolve_price
from pipeline.teachers.logs import import_logs
from pipeline.teachers.sources import is_table_file, read_rows

log = logging.getLogger(__name__)

NAME = "capture"
SECTIONS = ("teacher", "capture")
UPSTREAM: tuple[str, ...] = ()
OUTPUT = "teacher.jsonl"


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    provider, ref = parse_spec(recipe.teacher.spec)
    files = {"task": recipe.capture.task}
    if provider == "logs":
        files["logs"] = Path(ref)
    elif is_table_file(recipe.capture.prompts):
        files["prompts"] = recipe.capture.prompts
    # Otherwise a dataset folder or hub id: the recipe names it, which the fingerprint covers.
    return files


@dataclass
class Entry:
    """One output record to be: a prompt, which sample of it, and its cache job."""

    prompt: dict
    sample: int
    job: Job


@dataclass
class Outcome:
    report: DispatchReport
    cache_hits: int
    ledger: Ledger | None = None
    notes: list[str] = field(default_factory=list)


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    provider, _ = parse_spec(recipe.teacher.spec)
    if provider == "logs":
        return run_logs(recipe, inputs["logs"], out, tracker)
    task = load_task(inputs["task"])
    prompts = load_prompts(inputs.get("prompts", recipe.capture.prompts), recipe.capture)
    labels = task.labels if task.kind == "classification" else None
    teacher = build_teacher(recipe.teacher.spec, recipe.teacher, labels)
    identity = teacher.identity()
    price = None if provider == "local" else resolve_price(provider, teacher.model, recipe.teacher)
    entries = _entries(prompts, task, identity, recipe.teacher)
    cache = TeacherCache(recipe.capture.cache)
    try:
        outcome = _answer(teacher, provider, entries, cache, price, recipe.teacher)
        if not outcome.report.budget_stop:
            _write_records(out / OUTPUT, entries, cache, outcome.report.failures, teacher.spec, identity, recipe)
    finally:
        cache.close()
    if getattr(teacher, "logprobs_refused", False):
        outcome.notes.append("the server refused logprobs; records carry none")
    manifest = _manifest(len(prompts), len(entries), outcome, price)
    tracker.params({"teacher": identity, "prompts": len(prompts), "samples_per_prompt": recipe.teacher.n,
                    "price": _price_params(price)})
    tracker.metrics({**manifest.counts, **manifest.metrics, "cost_usd": manifest.cost_usd})
    _check(outcome, len(entries), recipe.teacher)
    log.info("capture: %s", "; ".join(manifest.notes[:1]))
    return manifest


# ---------------------------------------------------------------- prompts


def load_prompts(source: Path | str, cfg: CaptureConfig) -> list[dict]:
    """Read the prompts; each record needs a non-empty `cfg.prompt_field`. Ids default to row order."""
    prompts = []
    for n, (where, rec) in enumerate(read_rows(source, cfg.prompts_split), start=1):
        text = rec.get(cfg.prompt_field)
        if not isinstance(text, str) or not text.strip():
            raise DistillError(f"{where}: no '{cfg.prompt_field}' text (set capture.prompt_field to the right column)")
        prompts.append({**rec, "prompt": text, "id": str(rec.get("id") or f"p{n:06d}")})
        if cfg.limit and len(prompts) >= cfg.limit:
            break
    if not prompts:
        raise DistillError(f"{source}: no prompts")
    return prompts


# ---------------------------------------------------------------- asking


def _entries(prompts: list[dict], task: Task, identity: dict, cfg: TeacherConfig) -> list[Entry]:
    entries = []
    for prompt in prompts:
        messages = task.teacher_messages(prompt["prompt"], cfg.few_shot)
        entries += [Entry(prompt, s, Job(cache_key(identity, messages, s), messages)) for s in range(cfg.n)]
    return entries


def _answer(teacher, provider: str, entries: list[Entry], cache: TeacherCache, price: Price | None,
            cfg: TeacherConfig) -> Outcome:
    """Ask the teacher for every entry the cache lacks (each distinct key once)."""
    cached = cache.costs([e.job.key for e in entries])
    hits = sum(1 for e in entries if e.job.key in cached)
    todo = list({e.job.key: e.job for e in entries if e.job.key not in cached}.values())
    if provider == "local":
        return Outcome(_ask_local(teacher, todo, cache, cfg.batch_size), hits)
    ledger = Ledger(price, cfg.budget_usd, prior_usd=sum(cached.values()))
    return Outcome(_ask_remote(teacher, todo, cache, ledger, cfg), hits, ledger)


def _ask_local(teacher, todo: list[Job], cache: TeacherCache, batch_size: int) -> DispatchReport:
    """Batched generation; each batch is committed before the next is asked."""
    report = DispatchReport()
    with tqdm(total=len(todo), desc="capture (teacher)", unit="prompt", disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            completions = asyncio.run(teacher.complete_batch([job.messages for job in batch]))
            cache.put_many({job.key: c for job, c in zip(batch, completions)})
            report.attempts += 1
            report.ok += len(batch)
            bar.update(len(batch))
    return report


def _ask_remote(teacher, todo: list[Job], cache: TeacherCache, ledger: Ledger, cfg: TeacherConfig) -> DispatchReport:
    """Concurrent calls through the dispatcher; each answer is committed as it arrives."""
    bar = tqdm(total=len(todo), desc=f"capture ({teacher.spec})", unit="call", disable=not todo)

    def on_answer(job: Job, completion: Completion) -> None:
        if completion.error is None:
            cache.put_many({job.key: completion})
        bar.update(1)
        bar.set_postfix_str(f"${ledger.total_usd:.4f}", refresh=False)

    async def go() -> DispatchReport:
        try:
            return await Dispatcher(teacher, Limits.from_config(cfg), ledger, on_answer).run(todo)
        finally:
            await teacher.aclose()

    try:
        return asyncio.run(go())
    finally:
        bar.close()


# ---------------------------------------------------------------- records


def _write_records(path: Path, entries: list[Entry], cache: TeacherCache, failures: dict[str, Completion],
                   spec: str, identity: dict, recipe: Recipe) -> None:
    """Stream records in prompt order from the cache (plus this run's failures) to a temp
    file, then rename: a reader never sees a half-written teacher.jsonl."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, len(entries), 500):
            chunk = entries[start : start + 500]
            found = cache.get_many([e.job.key for e in chunk])
            for e in chunk:
                completion = found.get(e.job.key) or failures[e.job.key]
                record = make_record(e.prompt, completion, spec, identity, "capture", recipe.capture.gold_field,
                                     sample=e.sample, n=recipe.teacher.n)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_record(prompt: dict, completion: Completion, spec: str, identity: dict, source: str,
                gold_field: str | None, sample: int = 0, n: int = 1) -> dict:
    meta = {
        "teacher": spec,
        "params": identity,
        "source": source,
        "prompt_sha": sha256_json(prompt["prompt"])[:16],
        "sample": sample,
        "cost_usd": completion.cost_usd,
        "latency_ms": completion.latency_ms,
        "usage": completion.usage,
        "logprobs": completion.logprobs,
        "finish_reason": completion.finish_reason,
        "error": completion.error,
        "created_at": completion.created_at,
    }
    if gold_field and prompt.get(gold_field) is not None:
        meta["gold"] = prompt[gold_field]
    return {
        "id": prompt["id"] if n == 1 else f"{prompt['id']}#{sample}",
        "messages": [
            {"role": "user", "content": prompt["prompt"]},
            {"role": "assistant", "content": completion.text},
        ],
        "meta": meta,
    }


# ---------------------------------------------------------------- accounting


def _manifest(prompts: int, records: int, outcome: Outcome, price: Price | None) -> Manifest:
    report, ledger = outcome.report, outcome.ledger
    cost = ledger.spent_usd if ledger else 0.0  # what this run paid; cached answers are free
    counts = {
        "prompts": prompts,
        "records": records,
        "cache_hits": outcome.cache_hits,
        "teacher_calls": report.sent,
        "ok": report.ok,
        "failed": report.failed,
        "retries": max(report.attempts - report.sent, 0) if ledger else 0,
        "not_sent": report.not_sent,
    }
    metrics: dict[str, float | None] = {}
    if ledger:
        counts |= {"prompt_tokens": ledger.prompt_tokens, "completion_tokens": ledger.completion_tokens}
        metrics["cost_usd_prompt_set"] = ledger.total_usd
    notes = [f"{report.ok} ok / {report.failed} failed of {report.sent} calls, {outcome.cache_hits} cached, "
             f"${cost:.4f} this run"]
    if ledger and price is None:
        notes.append("unpriced teacher (teacher.allow_unpriced): cost recorded as $0")
    elif price is not None:
        notes.append(f"price ${price.input_per_mtok}/${price.output_per_mtok} per 1M tokens in/out ({price.source})")
    return Manifest(stage=NAME, counts=counts, metrics=metrics, cost_usd=cost, notes=notes + outcome.notes)


def _price_params(price: Price | None) -> dict:
    if price is None:
        return {}
    return {"input_per_mtok": price.input_per_mtok, "output_per_mtok": price.output_per_mtok, "source": price.source}


def _check(outcome: Outcome, records: int, cfg: TeacherConfig) -> None:
    """Budget stop and too many failures end the stage after everything bought is cached."""
    report, ledger = outcome.report, outcome.ledger
    if report.budget_stop:
        answered = records - report.not_sent - report.failed
        raise DistillError(
            f"budget reached: teacher.budget_usd=${cfg.budget_usd:.4f}, ${ledger.total_usd:.4f} spent on this "
            f"prompt set (${ledger.spent_usd:.4f} this run); {answered}/{records} answers bought, "
            f"{report.not_sent} not sent. They are cached: rerun with a higher teacher.budget_usd to continue."
        )
    if report.sent and report.failed / report.sent > cfg.max_failure_rate:
        first = next(iter(report.failures.values())).error
        raise DistillError(
            f"{report.failed} of {report.sent} teacher calls failed after retries "
            f"({report.failed / report.sent:.1%} > teacher.max_failure_rate={cfg.max_failure_rate:.1%}); "
            f"the {report.ok} answers are cached, rerun to retry the rest. First error: {first}"
        )


# ---------------------------------------------------------------- logs:


def run_logs(recipe: Recipe, path: Path, out: Path, tracker) -> Manifest:
    """Import existing answers: no teacher calls, no cost."""
    imported = import_logs(path, recipe.teacher.prompt_col, recipe.teacher.label_col)
    rows = imported.records[: recipe.capture.limit] if recipe.capture.limit else imported.records
    spec = recipe.teacher.spec
    identity = {"provider": "logs", "path": str(path)}
    records = [
        make_record({**r.row, "id": r.id, "prompt": r.prompt}, Completion(text=r.answer), spec, identity, "logs",
                    recipe.capture.gold_field)
        for r in rows
    ]
    write_jsonl(out / OUTPUT, records)
    notes = [f"imported {len(records)} records from {path}"]
    if imported.rejected:
        notes.append(imported.rejected_summary())
        log.warning("%s", imported.rejected_summary())
    counts = {"prompts": len(records), "records": len(records), "cache_hits": 0, "teacher_calls": 0,
              "rejected": len(imported.rejected)}
    tracker.params({"teacher": identity, "prompts": len(records)})
    tracker.metrics(counts)
    return Manifest(stage=NAME, counts=counts, notes=notes)
