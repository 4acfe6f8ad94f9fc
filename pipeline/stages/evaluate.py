"""Evaluate: is the tuned student as good as the teacher, for how much traffic, at what cost?

    distill evaluate RECIPE

Three systems answer the same held-out prompts: the base student with the task's
instructions (`eval.base_prompt`; decoding constrained to the label set on a classification
task, as the local teacher does), the tuned student exactly as served (what it sees of each
conversation, in the shape curate resolved: `student_input.json`, recorded in the policy),
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

from pathlib import Path

from pipeline.artifacts import (
    CAPTURE_RECORDS,
    CURATED_DATASET,
    FINETUNE_ADAPTER,
    Manifest,
    finished_manifest,
    read_jsonl,
    sha256_json,
)
from pipeline.config import Recipe
from pipeline.conversation import Shape, StudentView, read_student_view
from pipeline.errors import DistillError
from pipeline.evaluation.answering import Answers, answer_all
from pipeline.evaluation.cost import cost_figures, priced_as_api
from pipeline.evaluation.gate import check_gate
from pipeline.evaluation.outputs import log_outputs, write_outputs
from pipeline.evaluation.quality import GATE_FIGURES, flatten_figures, quality_figures
from pipeline.evaluation.routing import agreement, replay_figures, routing, signal_quality
from pipeline.evaluation.threshold import agreement_at_coverage
from pipeline.llm.policy import SIGNALS
from pipeline.stats import mean_figure
from pipeline.task import Task, agrees, load_task

NAME = "evaluate"
# The teacher fields that change its answers matter only to eval.file (the teacher answers it here).
READS: tuple[str, ...] = (
    "model.base",
    "model.chat_template",
    "eval",
    "router",
    "teacher.spec",
    "teacher.max_new_tokens",
    "teacher.temperature",
    "teacher.few_shot",
    "teacher.constrain_to_labels",
    "teacher.constrain_to_schema",
    "teacher.base_url",
)
UPSTREAM: tuple[str, ...] = ("capture", "curate", "finetune")
RESUMABLE = False
ALL_RANKS = False
SYSTEM_METRICS = False


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    files = {"task": recipe.capture.task}
    if recipe.eval.file is not None:
        files["eval_file"] = recipe.eval.file
    return files


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from datasets import load_from_disk
    from peft import PeftModel

    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    task = load_task(inputs["task"])
    _check_recipe_fits_task(recipe, task)
    view = read_student_view(inputs["curate"])
    dataset = load_from_disk(str(inputs["curate"] / CURATED_DATASET), keep_in_memory=True)
    test = list(dataset["test"])[: recipe.eval.limit]
    validation = list(dataset["validation"])[: recipe.eval.limit]
    if not test or not validation:
        raise DistillError("evaluate: the test or validation split is empty; lower curate.split or add prompts")
    tokenizer = load_tokenizer(recipe.model.base, recipe.model.chat_template)
    plan = device_plan()
    base = load_model(recipe.model.base, plan).eval()

    shape = view.shape
    base_answers = answer_all(
        base, tokenizer, test, recipe, task, "base student", shape, base_prompt=recipe.eval.base_prompt
    )
    tuned = PeftModel.from_pretrained(base, str(inputs["finetune"] / FINETUNE_ADAPTER)).eval()
    tuned_answers = answer_all(tuned, tokenizer, test, recipe, task, "tuned student", shape)
    val_answers = answer_all(tuned, tokenizer, validation, recipe, task, "tuned (validation)", shape)

    result = assess(
        recipe,
        task,
        test,
        validation,
        base_answers,
        tuned_answers,
        val_answers,
        read_jsonl(inputs["capture"] / CAPTURE_RECORDS),
        view,
        record_token_counter(tokenizer),
    )
    spent = 0.0
    if recipe.eval.judge is not None and task.kind == "generation":
        spent += judge_test(recipe, task, result)
    if "eval_file" in inputs:
        spent += assess_heldout(recipe, task, inputs["eval_file"], tuned, tokenizer, result, shape)
    trained = finished_manifest(inputs["finetune"])
    adapter_sha = sha256_json(trained.outputs)
    result["base_weights"] = base_weights(trained.metrics.get("base_4bit"), plan.dtype_name)
    write_outputs(out, recipe, task, result, adapter_sha)
    log_outputs(tracker, out, result["flat"])
    check_gate(result["figures"], recipe.eval.gate)
    counts = {"test_examples": len(test), "validation_examples": len(validation)}
    if "heldout" in result:
        counts["eval_file_examples"] = result["heldout"]["n"]
    return Manifest(stage=NAME, counts=counts, metrics=result["flat"], cost_usd=spent)


def base_weights(trained_4bit: float | None, evaluated_dtype: str) -> dict:
    """Which base the adapter learned against and which one this evaluation answered with.
    QLoRA trains against dequantised NF4 weights; evaluate, export and serving use the unquantised
    base, so a QLoRA run's figures are for the model that is served, not the one that was trained."""
    trained = {None: "not recorded", 0.0: "unquantised", 1.0: "NF4 4-bit (bitsandbytes)"}[trained_4bit]
    return {"trained_against": trained, "evaluated_on": f"unquantised {evaluated_dtype}", "same": trained_4bit == 0.0}


def judge_test(recipe: Recipe, task: Task, result: dict) -> float:
    """Pairwise LLM judge, tuned student vs teacher on the test split; returns what it cost."""
    from pipeline.conversation import conversation_of, transcript
    from pipeline.evaluation.judge import judge_figures, pairwise
    from pipeline.teachers.service import TeacherService

    assert recipe.eval.judge is not None  # called only when eval.judge is set
    service = TeacherService.from_config(recipe.eval.judge, recipe.capture.cache, progress="evaluate (judge)")
    try:
        rows = result["test"]
        outcomes, verdicts = pairwise(
            service,
            [transcript(conversation_of(r)) for r in rows],
            [a.text for a in result["tuned"]],
            [r["completion"] for r in rows],
            recipe.eval.judge_rubric,
        )
        spent = service.report.spent_usd
    finally:
        service.close()
    figures = {
        f"tuned_{k}": v for k, v in judge_figures(outcomes, verdicts, recipe.eval.bootstrap, recipe.eval.seed).items()
    }
    result["figures"].update(figures)
    result["flat"].update(flatten_figures(figures))
    result["judge"] = {"spec": recipe.eval.judge.spec, "outcomes": outcomes, "usd": spent}
    return spent


def assess_heldout(recipe: Recipe, task: Task, path: Path, tuned, tokenizer, result: dict, shape: Shape) -> float:
    """The same three systems and the chosen policy on the user's own file; figures prefixed file_.
    Returns what the teacher's answers cost. `tuned` wraps `base`, so the base student answers
    with the adapter disabled."""
    from pipeline.evaluation.heldout import read_heldout, teacher_answers

    rows = read_heldout(path, recipe.eval.file_prompt_field, recipe.eval.file_gold_field)
    rows, spent = teacher_answers(recipe, task, rows)
    with tuned.disable_adapter():
        base_answers = answer_all(
            tuned, tokenizer, rows, recipe, task, "base (eval.file)", shape, base_prompt=recipe.eval.base_prompt
        )
    tuned_answers = answer_all(tuned, tokenizer, rows, recipe, task, "tuned (eval.file)", shape)
    reps, seed = recipe.eval.bootstrap, recipe.eval.seed
    figures, _ = quality_figures(task, rows, base_answers.completions, tuned_answers.completions, reps, seed)
    fields = recipe.router.fields
    agree = [agrees(task, a.text, r["completion"], fields) for a, r in zip(tuned_answers.completions, rows)]
    figures.update(
        replay_figures(result["choice"].policy, tuned_answers.completions, agree, rows, task, reps, seed, fields)
    )
    figures = {f"file_{k}": v for k, v in figures.items()}
    result["figures"].update(figures)
    result["flat"].update(flatten_figures(figures))
    result["heldout"] = {"file": str(path), "n": len(rows), "teacher_usd": spent}
    return spent


def _check_recipe_fits_task(recipe: Recipe, task: Task) -> None:
    if SIGNALS[recipe.router.signal].needs_label_scores and task.kind != "classification":
        raise DistillError(
            f"router.signal={recipe.router.signal} needs a classification task; "
            f"{task.name} is {task.kind}: use mean_logprob or min_logprob"
        )
    if recipe.router.signal == "field_prob" and task.kind != "extraction":
        raise DistillError(
            f"router.signal=field_prob reads a JSON answer's fields; {task.name} is {task.kind}: "
            "use mean_logprob, p10_logprob or logistic"
        )
    if recipe.router.fields:
        known = list((task.output_schema or {}).get("properties") or {})
        unknown = [f for f in recipe.router.fields if f not in known]
        if task.kind != "extraction" or unknown:
            raise DistillError(
                f"router.fields: {', '.join(unknown or recipe.router.fields)} is not a field of "
                f"{task.name}'s output_schema (fields: {', '.join(known) or 'none'})"
            )
    if recipe.router.decode == "label_posterior" and task.kind != "classification":
        raise DistillError(
            f"router.decode=label_posterior answers with one of the task's labels; {task.name} is "
            f"{task.kind}: use router.decode=generate"
        )
    unknown = sorted(set(recipe.eval.gate) - set(GATE_FIGURES))
    if unknown:
        raise DistillError(f"eval.gate: unknown figure {', '.join(unknown)}; known: {', '.join(GATE_FIGURES)}")


def record_token_counter(tokenizer):
    """(prompt, completion) tokens of a capture record in the student's tokenizer: how a record with no
    usage of its own (imported logs) is priced as an API."""

    def count(record: dict) -> tuple[int, int]:
        messages = record["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), len(answer) + 1  # + the end of turn

    return count


def assess(
    recipe: Recipe,
    task: Task,
    test: list[dict],
    validation: list[dict],
    base: Answers,
    tuned: Answers,
    val: Answers,
    records: list[dict],
    view: StudentView,
    count_tokens=None,
) -> dict:
    reps, seed = recipe.eval.bootstrap, recipe.eval.seed
    figures, detail = quality_figures(task, test, base.completions, tuned.completions, reps, seed)
    routed = routing(recipe, task, test, validation, tuned.completions, val.completions, view.shape)
    choice, expected, confirmed = routed.choice, routed.expected, routed.confirmed
    figures.update(confirmed)
    # What `distill sweep` chooses on: the tuned student's agreement on validation, never test.
    fields = recipe.router.fields
    figures["tuned_validation_agreement"] = mean_figure(
        agreement(task, val.completions, validation, fields), reps, seed
    )
    signals = signal_quality(task, test, tuned.completions, validation, val.completions, choice.policy, fields)
    chosen_curve = signals["signals"][recipe.router.signal]["curve"]
    money = cost_figures(
        records,
        tuned.wall_s,
        len(test),
        recipe.eval.cost.student_usd_per_hour,
        confirmed["local_share"].value,
        chosen_curve,
    )
    money["priced_as"] = priced_as_api(
        recipe.eval.cost, test, records, money["student_usd_per_request"], confirmed["local_share"], count_tokens
    )
    flat: dict[str, float | None] = dict(flatten_figures(figures))  # Manifest.metrics: None where not measured
    flat.update(
        {f"{k}_usd_per_1k": r["usd_per_1k"] for k, r in zip(("teacher_only", "routed", "student_only"), money["rows"])}
    )
    if money["priced_as"]:
        api = money["priced_as"]
        flat["teacher_priced_usd_per_1k"] = api["teacher_usd_per_1k"]
        for key in (
            "routed_usd_per_1k",
            "routed_usd_per_1k_lo",
            "routed_usd_per_1k_hi",
            "saving",
            "saving_lo",
            "saving_hi",
        ):
            flat[f"priced_{key}"] = api[key]
    flat["expected_local_share"] = expected["local_share"].value
    flat["expected_system_agreement"] = expected["system_agreement"].value
    flat["threshold_bound"] = choice.bound
    flat["tuned_stop_rate"] = sum(a.stopped for a in tuned.completions) / len(test)
    for name, s in signals["signals"].items():
        flat[f"auroc_{name}"] = s["auroc"]
    for share in (50, 70, 90):  # selective agreement on test: the most confident share by the chosen signal
        flat[f"tuned_agreement_top{share}pct"] = agreement_at_coverage(chosen_curve, share / 100)
    return {
        "figures": figures,
        "detail": detail,
        "choice": choice,
        "expected": expected,
        "confirmed": confirmed,
        "signals": signals,
        "cost": money,
        "flat": flat,
        "on_test": routed.on_test,
        "chosen_on": routed.chosen_on,
        "test": test,
        "validation": validation,
        "view": view,
        "base": base.completions,
        "tuned": tuned.completions,
        "validation_answers": val.completions,
    }
