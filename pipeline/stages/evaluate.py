"""Evaluate: how often does the student agree with the teacher, before and after tuning?

    distill evaluate RECIPE

On the held-out test split, the base student and the tuned student (base + adapter)
answer from the user message alone. Agreement is exact match with the teacher's label
(after label normalisation). The router's confidence threshold is chosen on the
validation split: the lowest mean-token-logprob at which answered requests still agree
with the teacher at `router.quality_target`. Writes `report.json`, `report.md`,
`predictions.jsonl` and `router_policy.json`.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from pipeline.artifacts import Manifest, atomic_write_json, atomic_write_text, write_jsonl
from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.task import Task, load_task

NAME = "evaluate"
SECTIONS = ("model", "eval", "router")
UPSTREAM = ("curate", "finetune")


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    return {"task": recipe.capture.task}


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from datasets import load_from_disk
    from peft import PeftModel

    from pipeline.models import device_plan, load_model, load_tokenizer

    task = load_task(inputs["task"])
    dataset = load_from_disk(str(inputs["curate"] / "dataset"), keep_in_memory=True)
    test = list(dataset["test"])[: recipe.eval.limit]
    validation = list(dataset["validation"])[: recipe.eval.limit]
    if not test:
        raise DistillError("evaluate: the test split is empty; lower curate.split.test or add prompts")
    tokenizer = load_tokenizer(recipe.model.base, recipe.model.chat_template)
    base = load_model(recipe.model.base, device_plan()).eval()

    base_answers = answer_all(base, tokenizer, test, recipe, "base student")
    tuned = PeftModel.from_pretrained(base, str(inputs["finetune"] / "adapter")).eval()
    tuned_answers = answer_all(tuned, tokenizer, test, recipe, "tuned student")
    val_answers = answer_all(tuned, tokenizer, validation, recipe, "tuned (validation)")

    scored = [_score(ex, b, t, task) for ex, b, t in zip(test, base_answers, tuned_answers)]
    policy = choose_threshold(
        [(_agrees(task, a.text, ex["completion"]), a.mean_logprob) for ex, a in zip(validation, val_answers)],
        recipe.router.quality_target,
    )
    policy["test_coverage"], policy["test_agreement_answered"] = _apply_threshold(scored, policy["threshold"])
    metrics = summarize(scored)
    gate = recipe.eval.quality_gate
    write_jsonl(out / "predictions.jsonl", scored)
    atomic_write_json(out / "report.json", {"metrics": metrics, "router": policy, "test_examples": len(test)})
    atomic_write_json(out / "router_policy.json", policy)
    atomic_write_text(out / "report.md", _report_md(metrics, policy, len(test)))
    tracker.metrics({**metrics, **{f"router_{k}": v for k, v in policy.items() if isinstance(v, (int, float))}})
    tracker.artifact(out / "report.md")
    tracker.artifact(out / "report.json")
    if gate is not None and metrics["tuned_agreement"] < gate:
        raise DistillError(f"evaluate: tuned agreement {metrics['tuned_agreement']:.3f} is below eval.quality_gate={gate}")
    return Manifest(stage=NAME, counts={"test_examples": len(test)}, metrics=metrics)


def answer_all(model, tokenizer, rows: list[dict], recipe: Recipe, desc: str):
    from pipeline.models import generate_batch

    answers = []
    size = recipe.eval.batch_size
    for start in tqdm(range(0, len(rows), size), desc=f"evaluate ({desc})", unit="batch"):
        convs = [[{"role": "user", "content": r["prompt"]}] for r in rows[start : start + size]]
        answers += generate_batch(model, tokenizer, convs, recipe.eval.max_new_tokens)
    return answers


def _agrees(task: Task, answer: str, reference: str) -> bool:
    if task.kind == "classification":
        label = task.normalize_label(answer)
        return label is not None and label == task.normalize_label(reference)
    return answer.strip() == reference.strip()


def _score(ex: dict, base, tuned, task: Task) -> dict:
    gold = ex.get("gold") or None
    return {
        "id": ex["id"],
        "prompt": ex["prompt"],
        "teacher": ex["completion"],
        "gold": gold,
        "base": base.text,
        "tuned": tuned.text,
        "tuned_confidence": tuned.mean_logprob,
        "base_agrees": _agrees(task, base.text, ex["completion"]),
        "tuned_agrees": _agrees(task, tuned.text, ex["completion"]),
        "teacher_correct": _agrees(task, ex["completion"], gold) if gold else None,
        "tuned_correct": _agrees(task, tuned.text, gold) if gold else None,
        "tuned_stopped": tuned.stopped,
    }


def summarize(scored: list[dict]) -> dict[str, float]:
    n = len(scored)
    metrics = {
        "base_agreement": sum(s["base_agrees"] for s in scored) / n,
        "tuned_agreement": sum(s["tuned_agrees"] for s in scored) / n,
        "tuned_stop_rate": sum(s["tuned_stopped"] for s in scored) / n,
    }
    with_gold = [s for s in scored if s["gold"]]
    if with_gold:
        metrics["teacher_accuracy"] = sum(s["teacher_correct"] for s in with_gold) / len(with_gold)
        metrics["tuned_accuracy"] = sum(s["tuned_correct"] for s in with_gold) / len(with_gold)
    return metrics


def choose_threshold(points: list[tuple[bool, float]], target: float) -> dict:
    """Lowest confidence threshold whose answered set agrees with the teacher >= target.

    Sort by confidence, walk down; the largest prefix meeting the target sets the
    threshold. None means the student alone never meets the target: escalate everything.
    """
    ranked = sorted(points, key=lambda p: -p[1])
    best = None
    agree = 0
    for i, (ok, conf) in enumerate(ranked, start=1):
        agree += ok
        if agree / i >= target:
            best = (conf, i, agree / i)
    if best is None:
        return {"threshold": None, "quality_target": target, "coverage": 0.0, "agreement_answered": None,
                "chosen_on": "validation", "examples": len(points)}
    conf, count, rate = best
    return {"threshold": conf, "quality_target": target, "coverage": count / len(points),
            "agreement_answered": rate, "chosen_on": "validation", "examples": len(points)}


def _apply_threshold(scored: list[dict], threshold: float | None) -> tuple[float, float | None]:
    if threshold is None:
        return 0.0, None
    answered = [s for s in scored if s["tuned_confidence"] >= threshold]
    if not answered:
        return 0.0, None
    return len(answered) / len(scored), sum(s["tuned_agrees"] for s in answered) / len(answered)


def _report_md(metrics: dict, policy: dict, n: int) -> str:
    lines = [f"# Evaluation ({n} test examples)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in metrics.items()]
    lines += ["", "## Router policy (chosen on validation)", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in policy.items()]
    return "\n".join(lines) + "\n"
