"""The router's policy, from validation, confirmed on test: temperature, hard gates, logistic
weights, the threshold with its guarantee, and how well every signal predicts agreement.

    .venv/bin/pytest -q tests/evaluation/test_evaluate_threshold.py tests/llm/test_policy.py

The logistic signal is fitted on the even-numbered validation answers and its threshold chosen
on the odd-numbered ones: fitted and tested on the same answers, the Clopper-Pearson guarantee
would not hold (the order of the candidates would depend on which answers agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pipeline.config import Recipe
from pipeline.conversation import Shape
from pipeline.evaluation import calibration
from pipeline.evaluation.threshold import Choice, Coverage, choose_threshold, measure, scores_of, sweep
from pipeline.llm.answer import served_schema
from pipeline.llm.completion import Completion
from pipeline.llm.gates import Gates
from pipeline.llm.policy import SIGNALS, Policy, replay
from pipeline.stats import Figure, mean_figure
from pipeline.task import Task, agrees


@dataclass
class Routing:
    choice: Choice
    expected: dict[str, Figure]  # on the validation answers the threshold was chosen on
    confirmed: dict[str, Figure]  # the same policy replayed on test
    on_test: Coverage
    chosen_on: str  # which validation answers the threshold was chosen on


def label_targets(task: Task, rows: list[dict]) -> list[str | None]:
    return [task.normalize_label(ex["completion"]) for ex in rows] if task.kind == "classification" else []


def agreement(task: Task, answers: list[Completion], rows: list[dict], fields: list[str] | None = None) -> list[bool]:
    """Does each answer agree with the teacher's (an extraction task: on `fields`, else the whole record)?"""
    return [agrees(task, a.text, ex["completion"], fields) for a, ex in zip(answers, rows)]


def policy_template(recipe: Recipe, task: Task, validation: list[dict], val: list[Completion], shape: Shape) -> Policy:
    """Everything of the policy but its threshold (and the logistic weights, fitted separately);
    `shape`: what the student was shown (the router feeds it the same)."""
    labels = tuple(task.labels) if task.kind == "classification" else None
    temperature = calibration.fit_temperature(val, label_targets(task, validation)) if labels else 1.0
    gates = Gates.for_task(task, recipe.curate.refusal_patterns)
    weights = {"intercept": 0.0} if recipe.router.signal == "logistic" else None  # replaced by the fit
    field_temperatures = (
        calibration.fit_field_temperatures(val, [ex["completion"] for ex in validation])
        if task.kind == "extraction"
        else None
    )
    return Policy(
        threshold=None,
        signal=recipe.router.signal,
        labels=labels,
        temperature=temperature,
        gates=gates,
        weights=weights,
        decode=recipe.router.decode,
        schema=served_schema(recipe, task),
        fields=tuple(recipe.router.fields) or None,
        field_temperatures=field_temperatures,
        student_input=shape,
    )


def routing(
    recipe: Recipe,
    task: Task,
    test: list[dict],
    validation: list[dict],
    tuned: list[Completion],
    val: list[Completion],
    shape: Shape,
) -> Routing:
    """Threshold chosen on validation, then the same policy replayed on test."""
    template = policy_template(recipe, task, validation, val, shape)
    fields = recipe.router.fields
    val_agree, test_agree = agreement(task, val, validation, fields), agreement(task, tuned, test, fields)
    chosen, chosen_on = list(range(len(val))), "validation"
    if template.signal == "logistic":
        fit_rows, chosen = chosen[0::2], chosen[1::2]
        # All agreeing (or none) on the fitting half: a constant score, the threshold then answers all or none.
        weights = calibration.fit_logistic([val[i] for i in fit_rows], [val_agree[i] for i in fit_rows])
        template = replace(template, weights=weights or {"intercept": 0.0})
        chosen_on = "validation (odd rows; the logistic weights were fitted on the even rows)"
    val, validation, val_agree = (
        [val[i] for i in chosen],
        [validation[i] for i in chosen],
        [val_agree[i] for i in chosen],
    )
    choice = choose_threshold(val, val_agree, recipe.router.quality_target, template, recipe.eval.confidence)
    reps, seed = recipe.eval.bootstrap, recipe.eval.seed
    expected = replay_figures(choice.policy, val, val_agree, validation, task, reps, seed, fields)
    confirmed = replay_figures(choice.policy, tuned, test_agree, test, task, reps, seed, fields)
    return Routing(choice, expected, confirmed, measure(choice.policy, tuned, test_agree), chosen_on)


def replay_figures(
    policy: Policy,
    answers: list[Completion],
    agree: list[bool],
    rows: list[dict],
    task: Task,
    reps: int,
    seed: int,
    fields: list[str] | None = None,
) -> dict[str, Figure]:
    """Local share and system agreement (escalations answered by the teacher), and system gold
    accuracy where gold exists, each with its bootstrap CI."""
    local = [d.route == "student" for d in replay(policy, answers)]
    figures = {
        "local_share": mean_figure(local, reps, seed),
        "system_agreement": mean_figure([ok if lo else True for ok, lo in zip(agree, local)], reps, seed),
    }
    gold_rows = [i for i, ex in enumerate(rows) if ex.get("gold")]
    if gold_rows:
        correct = [
            agrees(task, (answers[i].text if local[i] else rows[i]["completion"]), rows[i]["gold"], fields)
            for i in gold_rows
        ]
        figures["system_accuracy"] = mean_figure(correct, reps, seed)
    return figures


def signal_quality(
    task: Task,
    test: list[dict],
    tuned: list[Completion],
    validation: list[dict],
    val: list[Completion],
    policy: Policy,
    fields: list[str] | None = None,
) -> dict:
    """AUROC of every applicable signal for "agrees with teacher" on test, and their risk-coverage
    curves, each read through the chosen policy's gates. The logistic signal is the policy's own
    fit when it routes on it, else fitted on the whole validation split for this comparison."""
    agree = agreement(task, tuned, test, fields)
    weights = policy.weights or calibration.fit_logistic(val, agreement(task, val, validation, fields))
    out = {}
    for name, sig in SIGNALS.items():
        if (
            (sig.needs_label_scores and task.kind != "classification")
            or (name == "logistic" and not weights)
            or (name == "field_prob" and task.kind != "extraction")
        ):
            continue
        scores = scores_of(tuned, replace(policy, signal=name, weights=weights))
        out[name] = {"auroc": calibration.auroc(scores, agree), "curve": sweep(scores, agree)}
    # The reliability diagram needs a probability: the label posterior, else the logistic fit, else
    # the per-token geometric mean.
    if task.kind == "classification":
        prob, probs = "label_prob", scores_of(tuned, replace(policy, signal="label_prob"))
    elif task.kind == "extraction":
        prob, probs = "field_prob", scores_of(tuned, replace(policy, signal="field_prob"))
    elif weights:
        prob, probs = "logistic", scores_of(tuned, replace(policy, signal="logistic", weights=weights))
    else:
        prob = "exp(mean_logprob)"
        probs = [None if a.mean_logprob is None else math.exp(a.mean_logprob) for a in tuned]
    reliability = calibration.reliability(probs, agree)
    reliability["signal"] = prob
    return {"signals": out, "reliability": reliability, "temperature": policy.temperature, "logistic_weights": weights}
