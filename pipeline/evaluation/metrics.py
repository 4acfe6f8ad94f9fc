"""Scoring by task kind: agreement with the teacher and gold, scikit-learn classification
metrics, JSON field-level F1, and free-text overlap; each headline figure with a bootstrap CI.

    .venv/bin/pytest -q tests/test_evaluate_metrics.py
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.stats import Figure, bootstrap, mean_figure
from pipeline.task import Task, parse_json

INVALID = "(invalid)"  # a classification answer that is no label: scored as its own wrong class
NO_LABEL = "(no label)"  # a reference (teacher answer) that is no label: nothing can agree with it


def as_label(task: Task, answer: str, missing: str = INVALID) -> str:
    return task.normalize_label(answer) or missing


def macro_f1(y_true: list[str], y_pred: list[str], labels: list[str]) -> float:
    """Macro-F1 over the task's labels (an invalid answer counts against recall, never as a class)."""
    from sklearn.metrics import f1_score

    present = [label for label in labels if label in y_true or label in y_pred]
    return float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def classification_figures(y_true: list[str], y_pred: list[str], labels: list[str], reps: int, seed: int
                           ) -> dict[str, Figure]:
    """Accuracy and macro-F1 of y_pred against y_true, each with its bootstrap CI."""
    t, p = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    return {
        "accuracy": mean_figure(t == p, reps, seed),
        "macro_f1": bootstrap(lambda i: macro_f1(list(t[i]), list(p[i]), labels), len(t), reps, seed),
    }


def per_label(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support for each label (scikit-learn's classification report)."""
    from sklearn.metrics import classification_report

    report = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
    return {label: {k: float(v) for k, v in report[label].items()} for label in labels}


def confusion(y_true: list[str], y_pred: list[str], labels: list[str]) -> tuple[list[str], list[list[int]]]:
    """Confusion matrix rows = reference, columns = prediction; an invalid column when any answer was no label."""
    from sklearn.metrics import confusion_matrix

    axis = labels + ([INVALID] if INVALID in y_pred else [])
    return axis, confusion_matrix(y_true, y_pred, labels=axis).tolist()


# ---------------------------------------------------------------- extraction (JSON)


def flatten_fields(obj: Any, prefix: str = "") -> set[tuple[str, str]]:
    """(dotted field path, JSON-encoded leaf value) pairs: the unit field-level F1 counts."""
    if isinstance(obj, dict):
        return set().union(*(flatten_fields(v, f"{prefix}{k}.") for k, v in obj.items())) if obj else set()
    return {(prefix.rstrip("."), json.dumps(obj, sort_keys=True))}


def field_prf(answer: str, reference: str) -> tuple[float, float, float]:
    """Field-level precision, recall, F1 of one JSON answer against the teacher's JSON
    (an unparseable answer scores 0; two empty objects agree fully)."""
    ref = flatten_fields(parse_json(reference) or {})
    got = parse_json(answer)
    fields = flatten_fields(got) if got is not None else set()
    if not ref and not fields:
        return (1.0, 1.0, 1.0) if got is not None else (0.0, 0.0, 0.0)
    hit = len(ref & fields)
    p = hit / len(fields) if fields else 0.0
    r = hit / len(ref) if ref else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def schema_valid(answer: str, schema: dict | None) -> bool:
    from jsonschema import Draft202012Validator

    value = parse_json(answer)
    if value is None:
        return False
    return schema is None or Draft202012Validator(schema).is_valid(value)


def extraction_figures(answers: list[str], references: list[str], schema: dict | None, reps: int, seed: int
                       ) -> dict[str, Figure]:
    prf = [field_prf(a, r) for a, r in zip(answers, references)]
    return {
        "parse_rate": mean_figure([parse_json(a) is not None for a in answers], reps, seed),
        "schema_valid_rate": mean_figure([schema_valid(a, schema) for a in answers], reps, seed),
        "field_precision": mean_figure([x[0] for x in prf], reps, seed),
        "field_recall": mean_figure([x[1] for x in prf], reps, seed),
        "field_f1": mean_figure([x[2] for x in prf], reps, seed),
    }


# ---------------------------------------------------------------- free text


def chrf(answer: str, reference: str) -> float:
    """Sentence chrF (sacrebleu, character n-grams; 0-100 scaled to 0-1)."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(answer, [reference]).score / 100


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, longest common subsequence of words)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, answer)["rougeL"].fmeasure


def text_figures(answers: list[str], references: list[str], reps: int, seed: int) -> dict[str, Figure]:
    """Mean sentence chrF and ROUGE-L against the teacher's answers, each with its CI."""
    return {
        "chrf": mean_figure([chrf(a, r) for a, r in zip(answers, references)], reps, seed),
        "rouge_l": mean_figure([rouge_l(a, r) for a, r in zip(answers, references)], reps, seed),
    }
