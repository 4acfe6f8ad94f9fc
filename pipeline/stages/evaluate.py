"""Evaluate: is the tuned student as good as the teacher, for how much traffic, at what cost?

    distill evaluate RECIPE

Three systems answer the same held-out prompts: the base student with the task's
instructions (`eval.base_prompt`; decoding constrained to the label set on a classification
task, as the local teacher does), the tuned student exactly as served (user message only),
and the teacher (its captured answers). Each is scored against the teacher and, where the
data has them, against gold labels; every headline figure carries a bootstrap 95% CI.

The router's threshold is chosen on the validation split (pipeline/evaluation/threshold.py:
the most traffic on the student subject to a Clopper-Pearson lower bound >= router.quality_target)
and confirmed on test by replaying the router's own Policy. Cost per 1,000 requests compares
teacher-only, routed and student-only. Writes report.md / report.json / predictions.jsonl,
router_policy.json (read by `distill serve`) and four PNGs; `eval.gate` then fails the stage
when a named figure misses its bar.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.artifacts import (
    CAPTURE_RECORDS,
    CURATED_DATASET,
    EVAL_POLICY,
    EVAL_REPORT,
    FINETUNE_ADAPTER,
    Manifest,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    read_manifest,
    sha256_json,
    write_jsonl,
)
from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.evaluation import calibration, cost, plots
from pipeline.evaluation.gate import check_gate
from pipeline.evaluation.metrics import (
    NO_LABEL,
    agrees,
    as_label,
    classification_figures,
    confusion,
    extraction_figures,
    per_label,
    text_figures,
)
from pipeline.evaluation.render import report_markdown
from pipeline.evaluation.stats import Figure, mean_figure
from pipeline.evaluation.threshold import Choice, Coverage, choose_threshold, measure, scores_of, sweep
from pipeline.llm.completion import Completion
from pipeline.router.policy import SIGNALS, Policy, replay
from pipeline.task import Task, load_task

NAME = "evaluate"
# The teacher fields that change its answers matter only to eval.file (the teacher answers it here).
READS = ("model.base", "model.chat_template", "eval", "router", "teacher.spec", "teacher.max_new_tokens",
         "teacher.temperature", "teacher.few_shot", "teacher.constrain_to_labels", "teacher.base_url")
UPSTREAM = ("capture", "curate", "finetune")
RESUMABLE = False
ALL_RANKS = False
SYSTEM_METRICS = False
PREDICTIONS = "predictions.jsonl"
REPORT_MD = "report.md"


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    files = {"task": recipe.capture.task}
    if recipe.eval.file is not None:
        files["eval_file"] = recipe.eval.file
    return files


@dataclass
class Answers:
    """One system's answers to a split, and the wall time they took (the student's cost)."""

    completions: list[Completion]
    wall_s: float


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from datasets import load_from_disk
    from peft import PeftModel

    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    task = load_task(inputs["task"])
    _check_recipe_fits_task(recipe, task)
    dataset = load_from_disk(str(inputs["curate"] / CURATED_DATASET), keep_in_memory=True)
    test = list(dataset["test"])[: recipe.eval.limit]
    validation = list(dataset["validation"])[: recipe.eval.limit]
    if not test or not validation:
        raise DistillError("evaluate: the test or validation split is empty; lower curate.split or add prompts")
    tokenizer = load_tokenizer(recipe.model.base, recipe.model.chat_template)
    base = load_model(recipe.model.base, device_plan()).eval()

    base_answers = answer_all(base, tokenizer, test, recipe, task, "base student", base_prompt=recipe.eval.base_prompt)
    tuned = PeftModel.from_pretrained(base, str(inputs["finetune"] / FINETUNE_ADAPTER)).eval()
    tuned_answers = answer_all(tuned, tokenizer, test, recipe, task, "tuned student")
    val_answers = answer_all(tuned, tokenizer, validation, recipe, task, "tuned (validation)")

    result = assess(recipe, task, test, validation, base_answers, tuned_answers, val_answers,
                    read_jsonl(inputs["capture"] / CAPTURE_RECORDS))
    spent = 0.0
    if recipe.eval.judge is not None and task.kind == "generation":
        spent += judge_test(recipe, task, result)
    if "eval_file" in inputs:
        spent += assess_heldout(recipe, task, inputs["eval_file"], tuned, tokenizer, result)
    adapter_sha = sha256_json(read_manifest(inputs["finetune"]).outputs)
    write_outputs(out, recipe, task, result, adapter_sha)
    log_outputs(tracker, out, result["flat"])
    check_gate(result["figures"], recipe.eval.gate)
    counts = {"test_examples": len(test), "validation_examples": len(validation)}
    if "heldout" in result:
        counts["eval_file_examples"] = result["heldout"]["n"]
    return Manifest(stage=NAME, counts=counts, metrics=result["flat"], cost_usd=spent)


def judge_test(recipe: Recipe, task: Task, result: dict) -> float:
    """Pairwise LLM judge, tuned student vs teacher on the test split; returns what it cost."""
    from pipeline.evaluation.judge import judge_figures, pairwise
    from pipeline.teachers.service import TeacherService

    service = TeacherService.from_config(recipe.eval.judge, recipe.capture.cache, progress="evaluate (judge)")
    try:
        rows = result["test"]
        outcomes, verdicts = pairwise(service, [r["prompt"] for r in rows], [a.text for a in result["tuned"]],
                                      [r["completion"] for r in rows], recipe.eval.judge_rubric)
        spent = service.report.spent_usd
    finally:
        service.close()
    figures = {f"tuned_{k}": v for k, v in judge_figures(outcomes, verdicts, recipe.eval.bootstrap,
                                                         recipe.eval.seed).items()}
    result["figures"].update(figures)
    result["flat"].update(flatten_figures(figures))
    result["judge"] = {"spec": recipe.eval.judge.spec, "outcomes": outcomes, "usd": spent}
    return spent


def assess_heldout(recipe: Recipe, task: Task, path: Path, tuned, tokenizer, result: dict) -> float:
    """The same three systems and the chosen policy on the user's own file; figures prefixed file_.
    Returns what the teacher's answers cost. `tuned` wraps `base`, so the base student answers
    with the adapter disabled."""
    from pipeline.evaluation.heldout import read_heldout, teacher_answers

    rows = read_heldout(path, recipe.eval.file_prompt_field, recipe.eval.file_gold_field)
    rows, spent = teacher_answers(recipe, task, rows)
    with tuned.disable_adapter():
        base_answers = answer_all(tuned, tokenizer, rows, recipe, task, "base (eval.file)",
                                  base_prompt=recipe.eval.base_prompt)
    tuned_answers = answer_all(tuned, tokenizer, rows, recipe, task, "tuned (eval.file)")
    reps, seed = recipe.eval.bootstrap, recipe.eval.seed
    figures, _ = quality_figures(task, rows, base_answers.completions, tuned_answers.completions, reps, seed)
    agree = [agrees(task, a.text, r["completion"]) for a, r in zip(tuned_answers.completions, rows)]
    figures.update(replay_figures(result["choice"].policy, tuned_answers.completions, agree, rows, task, reps, seed))
    figures = {f"file_{k}": v for k, v in figures.items()}
    result["figures"].update(figures)
    result["flat"].update(flatten_figures(figures))
    result["heldout"] = {"file": str(path), "n": len(rows), "teacher_usd": spent}
    return spent


# ---------------------------------------------------------------- answering


def base_conversation(task: Task, prompt: str, form: str) -> list[dict]:
    """The honest baseline: the base student told the task (zero/few-shot), or bare as the tuned one."""
    if form == "bare":
        return Task.student_messages(prompt)
    return task.teacher_messages(prompt, few_shot=form == "few_shot")


def answer_all(model, tokenizer, rows: list[dict], recipe: Recipe, task: Task, desc: str,
               base_prompt: str | None = None) -> Answers:
    """Greedy answers in batches. The tuned student answers as served (user message only) and,
    on a classification task, with every label scored, which the label signals read."""
    from pipeline.llm.generate import PrefixCache, generate_batch

    labels = task.labels if task.kind == "classification" else None
    prefix = PrefixCache() if base_prompt is not None else None  # the instructions, run once for every batch
    completions, size, start = [], recipe.eval.batch_size, time.perf_counter()
    for i in tqdm(range(0, len(rows), size), desc=f"evaluate ({desc})", unit="batch"):
        batch = rows[i : i + size]
        if base_prompt is None:
            convs = [Task.student_messages(r["prompt"]) for r in batch]
            completions += generate_batch(model, tokenizer, convs, recipe.eval.max_new_tokens, source=desc,
                                          score_labels=labels)
        else:
            convs = [base_conversation(task, r["prompt"], base_prompt) for r in batch]
            completions += generate_batch(model, tokenizer, convs, recipe.eval.max_new_tokens, labels=labels,
                                          source=desc, prefix_cache=prefix)
    return Answers(completions, time.perf_counter() - start)


def _check_recipe_fits_task(recipe: Recipe, task: Task) -> None:
    if SIGNALS[recipe.router.signal].needs_label_scores and task.kind != "classification":
        raise DistillError(f"router.signal={recipe.router.signal} needs a classification task; "
                           f"{task.name} is {task.kind}: use mean_logprob or min_logprob")
    unknown = sorted(set(recipe.eval.gate) - set(GATE_FIGURES))
    if unknown:
        raise DistillError(f"eval.gate: unknown figure {', '.join(unknown)}; known: {', '.join(GATE_FIGURES)}")


# ---------------------------------------------------------------- scoring


GATE_FIGURES = (
    "base_agreement", "tuned_agreement", "base_macro_f1", "tuned_macro_f1", "base_accuracy", "tuned_accuracy",
    "teacher_accuracy", "tuned_gold_macro_f1", "teacher_gold_macro_f1", "tuned_field_f1", "base_field_f1",
    "tuned_parse_rate", "tuned_schema_valid_rate", "tuned_chrf", "base_chrf", "tuned_rouge_l", "base_rouge_l",
    "local_share", "system_agreement", "system_accuracy", "tuned_judge_win_rate", "tuned_judge_not_worse_rate",
)
GATE_FIGURES = GATE_FIGURES + tuple(f"file_{name}" for name in GATE_FIGURES)  # the same, on eval.file


def quality_figures(task: Task, test: list[dict], base: list[Completion], tuned: list[Completion],
                    reps: int, seed: int) -> tuple[dict[str, Figure], dict]:
    """Headline figures with CIs (vs teacher, and vs gold where present) and per-label detail."""
    figures: dict[str, Figure] = {}
    detail: dict = {}
    teacher = [ex["completion"] for ex in test]
    for name, answers in (("base", base), ("tuned", tuned)):
        figures[f"{name}_agreement"] = mean_figure([agrees(task, a.text, t) for a, t in zip(answers, teacher)],
                                                   reps, seed)
    if task.kind == "classification":
        ref = [as_label(task, t, NO_LABEL) for t in teacher]
        for name, answers in (("base", base), ("tuned", tuned)):
            pred = [as_label(task, a.text) for a in answers]
            figures[f"{name}_macro_f1"] = classification_figures(ref, pred, task.labels, reps, seed)["macro_f1"]
        tuned_pred = [as_label(task, a.text) for a in tuned]
        detail["per_label"] = per_label(ref, tuned_pred, task.labels)
        detail["confusion"] = dict(zip(("labels", "matrix"), confusion(ref, tuned_pred, task.labels)))
        figures.update(gold_figures(task, test, base, tuned, reps, seed))
    elif task.kind == "extraction":
        for name, answers in (("base", base), ("tuned", tuned)):
            for key, fig in extraction_figures([a.text for a in answers], teacher, task.output_schema,
                                               reps, seed).items():
                figures[f"{name}_{key}"] = fig
    else:
        for name, answers in (("base", base), ("tuned", tuned)):
            for key, fig in text_figures([a.text for a in answers], teacher, reps, seed).items():
                figures[f"{name}_{key}"] = fig
    return figures, detail


def gold_figures(task: Task, test: list[dict], base: list[Completion], tuned: list[Completion],
                 reps: int, seed: int) -> dict[str, Figure]:
    rows = [i for i, ex in enumerate(test) if ex.get("gold")]
    if not rows:
        return {}
    gold = [as_label(task, test[i]["gold"], NO_LABEL) for i in rows]
    systems = {"base": [as_label(task, base[i].text) for i in rows],
               "tuned": [as_label(task, tuned[i].text) for i in rows],
               "teacher": [as_label(task, test[i]["completion"]) for i in rows]}
    figures = {}
    for name, pred in systems.items():
        found = classification_figures(gold, pred, task.labels, reps, seed)
        figures[f"{name}_accuracy"] = found["accuracy"]
        figures[f"{name}_gold_macro_f1"] = found["macro_f1"]
    return figures


def label_targets(task: Task, rows: list[dict]) -> list[str | None]:
    return [task.normalize_label(ex["completion"]) for ex in rows] if task.kind == "classification" else []


def routing(recipe: Recipe, task: Task, test: list[dict], validation: list[dict], tuned: list[Completion],
            val: list[Completion]) -> tuple[Choice, dict, dict, Coverage]:
    """Temperature, threshold (validation), then the same policy replayed on test."""
    labels = tuple(task.labels) if task.kind == "classification" else None
    temperature = calibration.fit_temperature(val, label_targets(task, validation)) if labels else 1.0
    val_agree = [agrees(task, a.text, ex["completion"]) for a, ex in zip(val, validation)]
    test_agree = [agrees(task, a.text, ex["completion"]) for a, ex in zip(tuned, test)]
    choice = choose_threshold(val, val_agree, recipe.router.quality_target, recipe.router.signal,
                              recipe.eval.confidence, labels, temperature)
    reps, seed = recipe.eval.bootstrap, recipe.eval.seed
    expected = replay_figures(choice.policy, val, val_agree, validation, task, reps, seed)
    confirmed = replay_figures(choice.policy, tuned, test_agree, test, task, reps, seed)
    return choice, expected, confirmed, measure(choice.policy, tuned, test_agree)


def replay_figures(policy: Policy, answers: list[Completion], agree: list[bool], rows: list[dict], task: Task,
                   reps: int, seed: int) -> dict[str, Figure]:
    """Local share and system agreement (escalations answered by the teacher), and system gold
    accuracy where gold exists, each with its bootstrap CI."""
    local = [d.route == "student" for d in replay(policy, answers)]
    figures = {"local_share": mean_figure(local, reps, seed),
               "system_agreement": mean_figure([ok if lo else True for ok, lo in zip(agree, local)], reps, seed)}
    gold_rows = [i for i, ex in enumerate(rows) if ex.get("gold")]
    if gold_rows:
        correct = [agrees(task, (answers[i].text if local[i] else rows[i]["completion"]), rows[i]["gold"])
                   for i in gold_rows]
        figures["system_accuracy"] = mean_figure(correct, reps, seed)
    return figures


def signal_quality(task: Task, test: list[dict], tuned: list[Completion], choice: Choice) -> dict:
    """AUROC of every applicable signal for "agrees with teacher" on test, and their risk-coverage curves."""
    agree = [agrees(task, a.text, ex["completion"]) for a, ex in zip(tuned, test)]
    out = {}
    for name, sig in SIGNALS.items():
        if sig.needs_label_scores and task.kind != "classification":
            continue
        scores = scores_of(tuned, name, choice.policy.temperature)
        out[name] = {"auroc": calibration.auroc(scores, agree), "curve": sweep(scores, agree)}
    prob = "label_prob" if task.kind == "classification" else None
    # The reliability diagram needs a probability: the label posterior, else the per-token geometric mean.
    probs = scores_of(tuned, prob, choice.policy.temperature) if prob else [
        None if a.mean_logprob is None else math.exp(a.mean_logprob) for a in tuned]
    reliability = calibration.reliability(probs, agree)
    reliability["signal"] = prob or "exp(mean_logprob)"
    return {"signals": out, "reliability": reliability, "temperature": choice.policy.temperature}


def costs(recipe: Recipe, records: list[dict], tuned: Answers, n: int, local_share: float, curve: list[dict]) -> dict:
    per_hour = recipe.eval.cost.student_usd_per_hour
    teacher = cost.teacher_price(records, per_hour)
    student = cost.student_price(tuned.wall_s, n, per_hour)
    rows = cost.cost_rows(teacher.usd_per_request, student, local_share)
    # From "escalate everything" (coverage 0: the student runs, then the teacher) to every threshold.
    points = [(1000 * (student + teacher.usd_per_request), 1.0)]
    points += [(1000 * (student + (1 - r["coverage"]) * teacher.usd_per_request), r["system_agreement"])
               for r in curve]
    return {"teacher_usd_per_request": teacher.usd_per_request, "teacher_basis": teacher.basis,
            "student_usd_per_request": student, "student_usd_per_hour": per_hour,
            "student_requests_per_s": n / tuned.wall_s if tuned.wall_s else None,
            "rows": cost.rows_json(rows), "curve": points}


def assess(recipe: Recipe, task: Task, test: list[dict], validation: list[dict], base: Answers, tuned: Answers,
           val: Answers, records: list[dict]) -> dict:
    reps, seed = recipe.eval.bootstrap, recipe.eval.seed
    figures, detail = quality_figures(task, test, base.completions, tuned.completions, reps, seed)
    choice, expected, confirmed, on_test = routing(recipe, task, test, validation, tuned.completions,
                                                   val.completions)
    figures.update(confirmed)
    signals = signal_quality(task, test, tuned.completions, choice)
    chosen_curve = signals["signals"][recipe.router.signal]["curve"]
    money = costs(recipe, records, tuned, len(test), confirmed["local_share"].value, chosen_curve)
    flat = flatten_figures(figures)
    flat.update({f"{k}_usd_per_1k": r["usd_per_1k"] for k, r in zip(("teacher_only", "routed", "student_only"),
                                                                      money["rows"])})
    flat["expected_local_share"] = expected["local_share"].value
    flat["expected_system_agreement"] = expected["system_agreement"].value
    flat["threshold_bound"] = choice.bound
    flat["tuned_stop_rate"] = sum(a.stopped for a in tuned.completions) / len(test)
    for name, s in signals["signals"].items():
        flat[f"auroc_{name}"] = s["auroc"]
    return {"figures": figures, "detail": detail, "choice": choice, "expected": expected, "confirmed": confirmed,
            "signals": signals, "cost": money, "flat": flat, "on_test": on_test, "test": test, "validation": validation,
            "base": base.completions, "tuned": tuned.completions}


def flatten_figures(figures: dict[str, Figure]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for name, fig in figures.items():
        flat[name], flat[f"{name}_lo"], flat[f"{name}_hi"] = fig.value, fig.lo, fig.hi
    return flat


# ---------------------------------------------------------------- writing


def prediction_rows(task: Task, result: dict) -> list[dict]:
    policy: Policy = result["choice"].policy
    judged = result.get("judge", {}).get("outcomes") or [None] * len(result["test"])
    rows = []
    for ex, b, t, verdict in zip(result["test"], result["base"], result["tuned"], judged):
        gold = ex.get("gold") or None
        decision = policy.decide(t)
        rows.append({
            "id": ex["id"], "prompt": ex["prompt"], "teacher": ex["completion"], "gold": gold,
            "base": b.text, "tuned": t.text,
            "tuned_confidence": decision.score, "route": decision.route,
            "tuned_mean_logprob": t.mean_logprob, "tuned_label_logprobs": t.label_logprobs,
            "base_agrees": agrees(task, b.text, ex["completion"]),
            "tuned_agrees": agrees(task, t.text, ex["completion"]),
            "teacher_correct": agrees(task, ex["completion"], gold) if gold else None,
            "tuned_correct": agrees(task, t.text, gold) if gold else None,
            "tuned_stopped": t.stopped,
            **({"judge": verdict} if verdict else {}),
        })
    return rows


def policy_file(recipe: Recipe, result: dict, adapter_sha: str) -> dict:
    """router_policy.json: what the server loads (Policy.from_json) plus the evidence and the
    settings it was calibrated under; `adapter_sha256` ties it to one trained adapter."""
    choice: Choice = result["choice"]
    return {
        **choice.policy.to_json(), **choice.to_json(),
        "confidence": recipe.eval.confidence, "chosen_on": "validation",
        "expected": {k: f.to_json() for k, f in result["expected"].items()},
        "test": {k: f.to_json() for k, f in result["confirmed"].items()},
        "settings": {"max_new_tokens": recipe.eval.max_new_tokens, "prompt_form": "student_messages (user message only)",
                     "decoding": "greedy", "temperature": choice.policy.temperature,
                     "label_scoring": bool(choice.policy.labels)},
        "adapter_sha256": adapter_sha,
    }


def write_outputs(out: Path, recipe: Recipe, task: Task, result: dict, adapter_sha: str) -> None:
    router = policy_file(recipe, result, adapter_sha)
    write_pngs(out, recipe, result)
    report = {
        "metrics": result["flat"], "figures": {k: f.to_json() for k, f in result["figures"].items()},
        "detail": result["detail"], "router": router, "calibration": result["signals"], "cost": result["cost"],
        "test_examples": len(result["test"]), "validation_examples": len(result["validation"]),
        "base_prompt": recipe.eval.base_prompt, "bootstrap": {"reps": recipe.eval.bootstrap, "seed": recipe.eval.seed},
        "plots": sorted(p.name for p in out.glob("*.png")),
        "heldout": result.get("heldout"),
    }
    write_jsonl(out / PREDICTIONS, prediction_rows(task, result))
    atomic_write_json(out / EVAL_POLICY, router)
    atomic_write_json(out / EVAL_REPORT, report)
    atomic_write_text(out / REPORT_MD, report_markdown(report, recipe, task))


def write_pngs(out: Path, recipe: Recipe, result: dict) -> None:
    detail, signals, money = result["detail"], result["signals"], result["cost"]
    if "confusion" in detail:
        plots.confusion_png(out / plots.CONFUSION_PNG, detail["confusion"]["labels"], detail["confusion"]["matrix"],
                            "tuned student vs teacher (test)")
    rel = signals["reliability"]
    plots.reliability_png(out / plots.RELIABILITY_PNG, rel["bins"], rel["signal"], rel["ece"])
    confirmed, on_test = result["confirmed"], result["on_test"]
    chosen_risk = (on_test.coverage, 1 - on_test.agreement_answered) if on_test.answered else None
    plots.risk_coverage_png(out / plots.RISK_COVERAGE_PNG, {k: v["curve"] for k, v in signals["signals"].items()},
                            chosen_risk, recipe.router.quality_target)
    routed = money["rows"][1]
    plots.cost_quality_png(out / plots.COST_QUALITY_PNG, money["curve"],
                           (routed["usd_per_1k"], confirmed["system_agreement"].value),
                           (money["rows"][0]["usd_per_1k"], 1.0))


def log_outputs(tracker, out: Path, flat: dict) -> None:
    tracker.metrics({k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for path in (out / REPORT_MD, out / EVAL_REPORT, out / EVAL_POLICY, out / PREDICTIONS, *sorted(out.glob("*.png"))):
        tracker.artifact(path)
