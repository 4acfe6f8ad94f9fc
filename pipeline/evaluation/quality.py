"""Headline quality figures with bootstrap CIs, per task kind: against the teacher, and
against gold where the data has it; and the names `eval.gate` may set bars on."""

from __future__ import annotations

from pipeline.evaluation.metrics import (
    NO_LABEL,
    as_label,
    classification_figures,
    confusion,
    extraction_figures,
    most_often_wrong,
    per_field,
    per_label,
    text_figures,
)
from pipeline.llm.completion import Completion
from pipeline.stats import Figure, mean_figure
from pipeline.task import Task, agrees

GATE_FIGURES: tuple[str, ...] = (
    "base_agreement",
    "tuned_agreement",
    "base_macro_f1",
    "tuned_macro_f1",
    "base_accuracy",
    "tuned_accuracy",
    "teacher_accuracy",
    "tuned_gold_macro_f1",
    "teacher_gold_macro_f1",
    "tuned_field_f1",
    "base_field_f1",
    "tuned_parse_rate",
    "tuned_schema_valid_rate",
    "tuned_exact_match",
    "base_exact_match",
    "tuned_field_precision",
    "tuned_field_recall",
    "tuned_gold_field_f1",
    "tuned_gold_exact_match",
    "teacher_gold_field_f1",
    "teacher_gold_exact_match",
    "teacher_schema_valid_rate",
    "tuned_chrf",
    "base_chrf",
    "tuned_rouge_l",
    "base_rouge_l",
    "local_share",
    "system_agreement",
    "system_accuracy",
    "tuned_judge_win_rate",
    "tuned_judge_not_worse_rate",
)
GATE_FIGURES = GATE_FIGURES + tuple(f"file_{name}" for name in GATE_FIGURES)  # the same, on eval.file


def quality_figures(
    task: Task, test: list[dict], base: list[Completion], tuned: list[Completion], reps: int, seed: int
) -> tuple[dict[str, Figure], dict]:
    """Headline figures with CIs (vs teacher, and vs gold where present) and per-label detail."""
    figures: dict[str, Figure] = {}
    detail: dict = {}
    teacher = [ex["completion"] for ex in test]
    for name, answers in (("base", base), ("tuned", tuned)):
        figures[f"{name}_agreement"] = mean_figure(
            [agrees(task, a.text, t) for a, t in zip(answers, teacher)], reps, seed
        )
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
        figures.update(extraction_quality(task, test, base, tuned, reps, seed, detail))
    else:
        for name, answers in (("base", base), ("tuned", tuned)):
            for key, fig in text_figures([a.text for a in answers], teacher, reps, seed).items():
                figures[f"{name}_{key}"] = fig
    return figures, detail


def gold_figures(
    task: Task, test: list[dict], base: list[Completion], tuned: list[Completion], reps: int, seed: int
) -> dict[str, Figure]:
    rows = [i for i, ex in enumerate(test) if ex.get("gold")]
    if not rows:
        return {}
    gold = [as_label(task, test[i]["gold"], NO_LABEL) for i in rows]
    systems = {
        "base": [as_label(task, base[i].text) for i in rows],
        "tuned": [as_label(task, tuned[i].text) for i in rows],
        "teacher": [as_label(task, test[i]["completion"]) for i in rows],
    }
    figures = {}
    for name, pred in systems.items():
        found = classification_figures(gold, pred, task.labels, reps, seed)
        figures[f"{name}_accuracy"] = found["accuracy"]
        figures[f"{name}_gold_macro_f1"] = found["macro_f1"]
    return figures


def extraction_quality(
    task: Task, test: list[dict], base: list[Completion], tuned: list[Completion], reps: int, seed: int, detail: dict
) -> dict[str, Figure]:
    """Base and tuned against the teacher; base, tuned and the teacher against gold where the
    data has it; per-field tables (tuned vs teacher, and vs gold) into `detail`."""
    teacher = [ex["completion"] for ex in test]
    figures: dict[str, Figure] = {}
    for name, completions in (("base", base), ("tuned", tuned)):
        for key, fig in extraction_figures(
            [a.text for a in completions], teacher, task.output_schema, reps, seed
        ).items():
            figures[f"{name}_{key}"] = fig
    figures["teacher_schema_valid_rate"] = extraction_figures(teacher, teacher, task.output_schema, reps, seed)[
        "schema_valid_rate"
    ]
    tuned_text = [a.text for a in tuned]
    detail["per_field"] = per_field(tuned_text, teacher)
    detail["most_often_wrong"] = most_often_wrong(detail["per_field"])
    rows = [i for i, ex in enumerate(test) if ex.get("gold")]
    if rows:
        gold = [test[i]["gold"] for i in rows]
        systems = {
            "base": [base[i].text for i in rows],
            "tuned": [tuned_text[i] for i in rows],
            "teacher": [teacher[i] for i in rows],
        }
        for name, answers in systems.items():
            found = extraction_figures(answers, gold, task.output_schema, reps, seed)
            figures[f"{name}_gold_field_f1"] = found["field_f1"]
            figures[f"{name}_gold_exact_match"] = found["exact_match"]
        detail["per_field_gold"] = {
            name: per_field(answers, gold) for name, answers in systems.items() if name != "base"
        }
    return figures


def flatten_figures(figures: dict[str, Figure]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for name, fig in figures.items():
        flat[name], flat[f"{name}_lo"], flat[f"{name}_hi"] = fig.value, fig.lo, fig.hi
    return flat
