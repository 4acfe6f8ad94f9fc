"""Scoring by task kind: agreement with the teacher and gold, scikit-learn classification
metrics, JSON field-level F1, and free-text overlap; each headline figure with a bootstrap CI.

    .venv/bin/pytest -q tests/evaluation/test_evaluate_metrics.py
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.stats import Figure, bootstrap, bootstrap_rows, mean_figure
from pipeline.task import Task, parse_json, record_fields, same_value

INVALID = "(invalid)"  # a classification answer that is no label: scored as its own wrong class
NO_LABEL = "(no label)"  # a reference (teacher answer) that is no label: nothing can agree with it


def as_label(task: Task, answer: str, missing: str = INVALID) -> str:
    return task.normalize_label(answer) or missing


def macro_f1(y_true: list[str], y_pred: list[str], labels: list[str]) -> float:
    """Macro-F1 over the task's labels that occur in either list, as scikit-learn's
    f1_score(labels=those, average="macro", zero_division=0) gives it (tested): an invalid answer
    counts against recall, never as a class; NaN when no label occurs."""
    return float(macro_f1_rows(y_true, y_pred, labels, np.arange(len(y_true))[None, :])[0])


def macro_f1_rows(y_true: list[str], y_pred: list[str], labels: list[str], rows: np.ndarray) -> np.ndarray:
    """`macro_f1` of every row of indices at once ([resamples, n] -> [resamples]): per-label true
    positives and counts by bincount, so a 1,000-resample bootstrap is a few array passes rather
    than 1,000 scikit-learn calls."""
    code = {label: i for i, label in enumerate(labels)}
    k = len(labels)  # one code past the labels for anything that is no label
    t = np.array([code.get(x, k) for x in y_true], dtype=np.int64)[rows]
    p = np.array([code.get(x, k) for x in y_pred], dtype=np.int64)[rows]
    offset = np.arange(rows.shape[0])[:, None] * (k + 1)

    def per_label(codes: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        flat = (codes + offset)[where] if where is not None else (codes + offset).ravel()
        return np.bincount(flat, minlength=rows.shape[0] * (k + 1)).reshape(-1, k + 1)[:, :k]

    tp = per_label(t, t == p)
    spread = per_label(t) + per_label(p)  # 2tp + fp + fn: how often a label is in either list
    f1 = np.divide(2 * tp, spread, out=np.zeros(tp.shape), where=spread > 0)
    present = (spread > 0).sum(axis=1)
    return np.divide(f1.sum(axis=1), present, out=np.full(len(present), np.nan), where=present > 0)


def classification_figures(
    y_true: list[str], y_pred: list[str], labels: list[str], reps: int, seed: int
) -> dict[str, Figure]:
    """Accuracy and macro-F1 of y_pred against y_true, each with its bootstrap CI."""
    t, p = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    return {
        "accuracy": mean_figure(t == p, reps, seed),
        "macro_f1": bootstrap_rows(lambda rows: macro_f1_rows(y_true, y_pred, labels, rows), len(t), reps, seed),
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
#
# A field counts as an extracted fact when its value is present (not null, [] or ""). Per field
# and record: both present and equal is a true positive; a present value that is wrong or not in
# the reference a false positive, and a reference value not matched a false negative (a wrong
# value is both). Both absent is right but counts in neither precision nor recall, as in slot
# filling. A field the reference lacks (an extra key) can only be a false positive; an answer that
# is not a JSON object misses every reference fact.


@dataclass
class FieldCounts:
    """Per-record counts for one field (or summed over fields): arrays of length n records."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    right: np.ndarray  # the value equals the reference's (absent == absent)

    @staticmethod
    def prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def field_counts(answers: list[str], references: list[str]) -> dict[str, FieldCounts]:
    """Each field (reference fields first, in order, then extra ones) -> its per-record counts."""
    got = [record_fields(a) for a in answers]
    ref = [record_fields(r) or {} for r in references]
    names = list(dict.fromkeys([k for r in ref for k in r] + [k for g in got if g for k in g]))
    out = {}
    for name in names:
        rows = [_count(g.get(name) if g is not None else None, r.get(name)) for g, r in zip(got, ref)]
        out[name] = FieldCounts(*(np.array(col, dtype=float) for col in zip(*rows)))
    return out


def _count(answer, reference) -> tuple[int, int, int, int]:
    if answer is None and reference is None:
        return 0, 0, 0, 1
    if answer is not None and reference is not None and same_value(answer, reference):
        return 1, 0, 0, 1
    return 0, int(answer is not None), int(reference is not None), 0


def schema_valid(answer: str, schema: dict | None) -> bool:
    from jsonschema import Draft202012Validator

    value = parse_json(answer)
    if value is None:
        return False
    return schema is None or Draft202012Validator(schema).is_valid(value)


def extraction_figures(
    answers: list[str], references: list[str], schema: dict | None, reps: int, seed: int
) -> dict[str, Figure]:
    """Parse and schema-valid rates, record exact match, and micro-averaged field precision /
    recall / F1 over every (record, field), each with its bootstrap CI over records."""
    counts = field_counts(answers, references)
    tp, fp, fn = (sum((getattr(c, k) for c in counts.values()), np.zeros(len(answers))) for k in ("tp", "fp", "fn"))
    exact = [all(c.right[i] for c in counts.values()) and parse_json(a) is not None for i, a in enumerate(answers)]

    def micro(which: int) -> Figure:
        return bootstrap(
            lambda i: FieldCounts.prf(tp[i].sum(), fp[i].sum(), fn[i].sum())[which], len(answers), reps, seed
        )

    return {
        "parse_rate": mean_figure([isinstance(parse_json(a), dict) for a in answers], reps, seed),
        "schema_valid_rate": mean_figure([schema_valid(a, schema) for a in answers], reps, seed),
        "exact_match": mean_figure(exact, reps, seed),
        "field_precision": micro(0),
        "field_recall": micro(1),
        "field_f1": micro(2),
    }


def per_field(answers: list[str], references: list[str]) -> dict[str, dict[str, float]]:
    """Per field: precision, recall, F1, accuracy (the value right, absent included), support
    (records where the reference has it) and how many records have it wrong."""
    table = {}
    for name, c in field_counts(answers, references).items():
        p, r, f = FieldCounts.prf(c.tp.sum(), c.fp.sum(), c.fn.sum())
        table[name] = {
            "precision": p,
            "recall": r,
            "f1": f,
            "accuracy": float(c.right.mean()),
            "support": int((c.tp + c.fn).sum()),
            "wrong": int(len(c.right) - c.right.sum()),
        }
    return table


def most_often_wrong(table: dict[str, dict[str, float]], top: int = 3) -> list[str]:
    """The fields wrong in the most records (ties: the order of the table), at most `top`."""
    wrong = [name for name in sorted(table, key=lambda n: -table[n]["wrong"]) if table[name]["wrong"]]
    return wrong[:top]


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
