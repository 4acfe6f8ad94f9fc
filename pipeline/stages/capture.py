"""Capture: run the prompts through the teacher and record its answers as labels.

    distill capture RECIPE        (make distill runs it first)

Writes `teacher.jsonl` (one chat-format example per prompt). Answers come from the
SQLite cache when present; new ones are committed to it batch by batch, so an
interrupted capture resumes without paying the teacher twice.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.artifacts import Manifest, read_jsonl, sha256_json, write_jsonl
from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.task import Task, load_task
from pipeline.teachers import Completion, build_teacher
from pipeline.teachers.cache import TeacherCache, cache_key

NAME = "capture"
SECTIONS = ("teacher", "capture")
UPSTREAM: tuple[str, ...] = ()


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    return {"prompts": recipe.capture.prompts, "task": recipe.capture.task}


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    task = load_task(inputs["task"])
    prompts = load_prompts(inputs["prompts"], recipe.capture.prompt_field, recipe.capture.limit)
    teacher = build_teacher(recipe.teacher.spec, recipe.teacher)
    identity = teacher.identity()
    conversations = [task.teacher_messages(p["prompt"], recipe.teacher.few_shot) for p in prompts]
    keys = [cache_key(identity, conv) for conv in conversations]

    cache = TeacherCache(recipe.capture.cache)
    try:
        answers = cache.get_many(keys)
        hits = len(answers)
        todo = [i for i, k in enumerate(keys) if k not in answers]
        fresh = _ask_teacher(teacher, conversations, keys, todo, cache, recipe.teacher.batch_size)
        answers.update(fresh)
    finally:
        cache.close()

    records = [
        _record(p, answers[k], teacher.spec, identity, task, recipe.capture.gold_field)
        for p, k in zip(prompts, keys)
    ]
    write_jsonl(out / "teacher.jsonl", records)
    failed = sum(1 for r in records if r["meta"]["error"])
    calls = len(fresh)
    cost = sum(c.cost_usd for c in fresh.values())  # what this run paid; cached answers are free
    tracker.params({"teacher": identity, "prompts": len(prompts)})
    tracker.metrics({"cache_hits": hits, "teacher_calls": calls, "failed": failed, "cost_usd": cost})
    return Manifest(
        stage=NAME,
        counts={"prompts": len(prompts), "cache_hits": hits, "teacher_calls": calls, "failed": failed},
        cost_usd=cost,
    )


def load_prompts(path: Path, field: str, limit: int | None) -> list[dict]:
    """Read the prompts file; each record needs a non-empty `field`. Ids default to line order."""
    records = read_jsonl(path)
    prompts = []
    for i, rec in enumerate(records, start=1):
        text = rec.get(field)
        if not isinstance(text, str) or not text.strip():
            raise DistillError(f"{path}: record {i} has no '{field}' text")
        prompts.append({**rec, "prompt": text, "id": str(rec.get("id", f"p{i:06d}"))})
    if not prompts:
        raise DistillError(f"{path}: no prompts")
    return prompts[:limit] if limit else prompts


def _ask_teacher(teacher, conversations, keys, todo, cache, batch_size) -> dict[str, Completion]:
    """Ask for every uncached prompt in batches; commit each batch before asking the next."""
    fresh: dict[str, Completion] = {}
    if not todo:
        return fresh
    bar = tqdm(total=len(todo), desc="capture (teacher)", unit="prompt")
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        completions = asyncio.run(teacher.complete_batch([conversations[i] for i in batch]))
        answered = {keys[i]: c for i, c in zip(batch, completions)}
        cache.put_many(answered)
        fresh.update(answered)
        bar.update(len(batch))
    bar.close()
    return fresh


def _record(prompt: dict, completion: Completion, spec: str, identity: dict, task: Task, gold_field) -> dict:
    meta = {
        "teacher": spec,
        "params": identity,
        "source": "capture",
        "prompt_sha": sha256_json(prompt["prompt"])[:16],
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
        "id": prompt["id"],
        "messages": [
            {"role": "user", "content": prompt["prompt"]},
            {"role": "assistant", "content": completion.text},
        ],
        "meta": meta,
    }
