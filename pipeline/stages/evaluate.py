"""Evaluate: how often does the student agree with the teacher, before and after tuning?

    distill evaluate RECIPE

On the held-out test split, the base student and the tuned student (base + adapter)
answer from the user message alone. Agreement is exact match with the teacher's label
(after label normalisation). The router's confidence threshold is chosen on the
validation split: the lowest value of `router.signal` at which answered requests still
agree with the teacher at `router.quality_target` (none: the policy escalates everything),
then measured on test by replaying the router's own Policy. Writes `report.json`,
`report.md`, `predictions.jsonl` and `router_policy.json` (read by `distill serve`).
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from pipeline.artifacts import (
    CURATED_DATASET,
    EVAL_POLICY,
    EVAL_REPORT,
    FINETUNE_ADAPTER,
    Manifest,
    atomic_write_json,
    atomic_write_text,
    write_jsonl,
)
from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.evaluation.metrics import agrees, score_example, summarize
from pipeline.evaluation.threshold import choose_threshold, measure
from pipeline.llm.completion import Completion
from pipeline.task import Task, load_task

NAME = "evaluate"
READS = ("model.base", "model.chat_template", "eval", "router")
UPSTREAM = ("curate", "finetune")
RESUMABLE = False
SYSTEM_METRICS = False


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    return {"task": recipe.capture.task}


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from datasets import load_from_disk
    from peft import PeftModel

    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    task = load_task(inputs["task"])
    dataset = load_from_disk(str(inputs["curate"] / CURATED_DATASET), keep_in_memory=True)
    test = list(dataset["test"])[: recipe.eval.limit]
    validation = list(dataset["validation"])[: recipe.eval.limit]
    if not test:
        raise DistillError("evaluate: the test split is empty; lower curate.split.test or add prompts")
    tokenizer = load_tokenizer(recipe.model.base, recipe.model.chat_template)
    base = load_model(recipe.model.base, device_plan()).eval()

    base_answers = answer_all(base, tokenizer, test, recipe, "base student")
    tuned = PeftModel.from_pretrained(base, str(inputs["finetune"] / FINETUNE_ADAPTER)).eval()
    tuned_answers = answer_all(tuned, tokenizer, test, recipe, "tuned student")
    val_answers = answer_all(tuned, tokenizer, validation, recipe, "tuned (validation)")

    scored = [score_example(ex, b, t, task) for ex, b, t in zip(test, base_answers, tuned_answers)]
    val_agree = [agrees(task, a.text, ex["completion"]) for ex, a in zip(validation, val_answers)]
    policy = choose_threshold(val_answers, val_agree, recipe.router.quality_target, recipe.router.signal)
    on_val = measure(policy, val_answers, val_agree)
    on_test = measure(policy, tuned_answers, [s["tuned_agrees"] for s in scored])
    router = {**policy.to_json(), "coverage": on_val.coverage, "agreement_answered": on_val.agreement_answered,
              "chosen_on": "validation", "examples": len(validation),
              "test_coverage": on_test.coverage, "test_agreement_answered": on_test.agreement_answered}
    metrics = summarize(scored)
    write_jsonl(out / "predictions.jsonl", scored)
    atomic_write_json(out / EVAL_REPORT, {"metrics": metrics, "router": router, "test_examples": len(test)})
    atomic_write_json(out / EVAL_POLICY, router)
    atomic_write_text(out / "report.md", _report_md(metrics, router, len(test)))
    tracker.metrics({**metrics, **{f"router_{k}": v for k, v in router.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    tracker.artifact(out / "report.md")
    tracker.artifact(out / EVAL_REPORT)
    _check_gate(metrics, recipe.eval.quality_gate)
    return Manifest(stage=NAME, counts={"test_examples": len(test)}, metrics=metrics)


def answer_all(model, tokenizer, rows: list[dict], recipe: Recipe, desc: str) -> list[Completion]:
    """The student's greedy answers to each row's prompt, exactly as it is served."""
    from pipeline.llm.generate import generate_batch

    answers = []
    size = recipe.eval.batch_size
    for start in tqdm(range(0, len(rows), size), desc=f"evaluate ({desc})", unit="batch"):
        convs = [Task.student_messages(r["prompt"]) for r in rows[start : start + size]]
        answers += generate_batch(model, tokenizer, convs, recipe.eval.max_new_tokens, source=desc)
    return answers


def _check_gate(metrics: dict, gate: float | None) -> None:
    if gate is not None and metrics["tuned_agreement"] < gate:
        raise DistillError(f"evaluate: tuned agreement {metrics['tuned_agreement']:.3f} is below eval.quality_gate={gate}")


def _report_md(metrics: dict, policy: dict, n: int) -> str:
    lines = [f"# Evaluation ({n} test examples)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in metrics.items()]
    lines += ["", "## Router policy (chosen on validation)", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in policy.items()]
    if policy["threshold"] is None:
        lines += ["", f"No threshold met the quality target {policy['quality_target']}: the router escalates every request."]
    return "\n".join(lines) + "\n"
