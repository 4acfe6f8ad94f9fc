"""Evaluation figures on handmade predictions with known answers, CI coverage, gate and cost."""

import numpy as np
import pytest

from pipeline.errors import DistillError
from pipeline.evaluation.cost import cost_rows, teacher_price
from pipeline.evaluation.gate import check_gate
from pipeline.evaluation.metrics import (
    INVALID,
    classification_figures,
    confusion,
    extraction_figures,
    macro_f1,
    most_often_wrong,
    per_field,
    per_label,
)
from pipeline.stats import Figure, bootstrap, mean_figure


def test_macro_f1_and_per_label_on_handmade_predictions():
    truth = ["a", "a", "b", "b", "c", "c"]
    pred = ["a", "b", "b", "b", "c", INVALID]
    # a: P 1, R .5 -> F1 2/3; b: P 2/3, R 1 -> F1 .8; c: P 1, R .5 -> F1 2/3
    assert macro_f1(truth, pred, ["a", "b", "c"]) == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)
    detail = per_label(truth, pred, ["a", "b", "c"])
    assert detail["b"]["precision"] == pytest.approx(2 / 3) and detail["b"]["recall"] == 1.0
    assert detail["c"]["support"] == 2
    axis, matrix = confusion(truth, pred, ["a", "b", "c"])
    assert axis == ["a", "b", "c", INVALID] and matrix[2] == [0, 0, 1, 1]
    figs = classification_figures(truth, pred, ["a", "b", "c"], reps=200, seed=0)
    assert figs["accuracy"].value == pytest.approx(4 / 6)
    assert figs["macro_f1"].lo <= figs["macro_f1"].value <= figs["macro_f1"].hi


def test_macro_f1_and_its_interval_are_scikit_learns_over_every_resample():
    """The vectorised macro-F1 against scikit-learn's f1_score on the same resamples: labels that
    occur only in one list, answers that are no label, a resample with no label at all (NaN, left
    out of the interval), and the interval a per-resample scikit-learn loop gives."""
    from sklearn.metrics import f1_score

    from pipeline.evaluation.metrics import NO_LABEL, macro_f1_rows
    from pipeline.stats import resample_indices

    labels = [f"l{i}" for i in range(12)]
    rng = np.random.default_rng(3)
    truth = list(rng.choice(labels[:10] + [NO_LABEL], size=60))
    pred = [t if rng.random() < 0.5 else str(rng.choice(labels + [INVALID])) for t in truth]

    def sklearn_macro_f1(idx):
        t, p = [truth[i] for i in idx], [pred[i] for i in idx]
        present = [label for label in labels if label in t or label in p]
        return f1_score(t, p, labels=present, average="macro", zero_division=0) if present else np.nan

    rows = resample_indices(len(truth), 200, seed=5)
    assert np.allclose(macro_f1_rows(truth, pred, labels, rows), [sklearn_macro_f1(r) for r in rows], atol=1e-12)
    assert np.isnan(macro_f1([NO_LABEL, NO_LABEL], [INVALID, NO_LABEL], labels))
    figure = classification_figures(truth, pred, labels, reps=300, seed=7)["macro_f1"]
    reference = bootstrap(sklearn_macro_f1, len(truth), reps=300, seed=7)
    assert figure.n == reference.n
    assert [figure.value, figure.lo, figure.hi] == pytest.approx(
        [reference.value, reference.lo, reference.hi], abs=1e-12
    )


# Four records, hand-scored field by field (P = present value; absent = null, [] or missing):
#   1: id tp, name wrong (fp+fn), amount 5.0 == 5 tp, items in another order tp, note both absent,
#      an extra key the reference lacks (fp)                            -> tp 3, fp 2, fn 1
#   2: not JSON: every present reference value missed (id, amount, note) -> tp 0, fp 0, fn 3
#   3: amount given where the reference has none (fp), items missing (fn) -> tp 2, fp 1, fn 1
#   4: the reference exactly, spaced differently                       -> tp 5
# micro: tp 10, fp 3, fn 5 -> P 10/13, R 2/3, F1 5/7; exact match 1/4; parses 3/4.
REFERENCES = [
    '{"id": "A1", "name": "Ann", "amount": 5, "items": ["x", "y"], "note": null}',
    '{"id": "B2", "name": null, "amount": 7, "items": [], "note": "gift"}',
    '{"id": "C3", "name": "Cy", "amount": null, "items": ["z"], "note": null}',
    '{"id": "D4", "name": "Di", "amount": 1, "items": ["q"], "note": "n"}',
]
ANSWERS = [
    '{"id": "A1", "name": "Anne", "amount": 5.0, "items": ["y", "x"], "extra": "z"}',
    "not json",
    '{"id": "C3", "name": "Cy", "amount": 3, "note": null}',
    '{"id":"D4","name":"Di","amount":1,"items":["q"],"note":"n"}',
]
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "name", "amount", "items", "note"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": ["string", "null"]},
        "amount": {"type": ["number", "null"]},
        "items": {"type": "array"},
        "note": {"type": ["string", "null"]},
    },
}


def test_field_level_metrics_match_hand_computed_values_with_missing_and_extra_fields():
    figs = extraction_figures(ANSWERS, REFERENCES, SCHEMA, reps=200, seed=0)
    assert figs["field_precision"].value == pytest.approx(10 / 13)
    assert figs["field_recall"].value == pytest.approx(2 / 3)
    assert figs["field_f1"].value == pytest.approx(5 / 7)
    assert figs["exact_match"].value == 0.25 and figs["parse_rate"].value == 0.75
    assert figs["schema_valid_rate"].value == 0.25  # 1: extra key, note missing; 3: items missing
    assert figs["field_f1"].lo <= 5 / 7 <= figs["field_f1"].hi and figs["field_f1"].n == 4
    table = per_field(ANSWERS, REFERENCES)
    assert list(table) == ["id", "name", "amount", "items", "note", "extra"]
    assert table["name"] == {
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(2 / 3),
        "accuracy": 0.75,
        "support": 3,
        "wrong": 1,
    }
    assert (table["amount"]["wrong"], table["amount"]["support"]) == (2, 3)
    assert table["id"]["precision"] == 1.0 and table["id"]["recall"] == 0.75
    assert table["items"]["recall"] == pytest.approx(2 / 3) and table["note"]["recall"] == 0.5
    assert table["extra"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.75, "support": 0, "wrong": 1}
    assert most_often_wrong(table) == ["amount", "id", "name"]


def test_an_answer_identical_to_the_reference_scores_one_everywhere():
    figs = extraction_figures(REFERENCES, REFERENCES, SCHEMA, reps=100, seed=0)
    assert all(figs[k].value == 1.0 for k in ("field_f1", "exact_match", "parse_rate", "schema_valid_rate"))


def test_bootstrap_ci_covers_the_true_rate_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    true_p, n, trials = 0.7, 200, 200
    hits = 0
    for t in range(trials):
        sample = rng.random(n) < true_p
        fig = mean_figure(sample, reps=400, seed=t)
        hits += fig.lo <= true_p <= fig.hi
    assert 0.89 <= hits / trials <= 0.99  # nominal 0.95; percentile bootstrap runs slightly under


def test_bootstrap_is_seeded_and_general():
    values = np.arange(50) % 3 == 0
    a = bootstrap(lambda i: values[i].mean(), 50, reps=300, seed=4)
    b = bootstrap(lambda i: values[i].mean(), 50, reps=300, seed=4)
    assert a == b and a.value == pytest.approx(values.mean())
    assert mean_figure(values, reps=300, seed=4) == mean_figure(values, reps=300, seed=4)
    assert a.lo < a.value < a.hi


def test_gate_names_the_figure_its_value_ci_and_bar():
    figures = {"tuned_agreement": Figure(0.62, 0.5, 0.7, 40), "system_agreement": Figure(0.99, 0.97, 1.0, 40)}
    check_gate(figures, {"system_agreement": 0.95})
    with pytest.raises(DistillError, match=r"tuned_agreement = 0\.620 \(95% CI 0\.500-0\.700\) is below the bar 0\.9"):
        check_gate(figures, {"tuned_agreement": 0.9, "system_agreement": 0.95})
    with pytest.raises(DistillError, match="eval.gate names system_accuracy, not measured"):
        check_gate(figures, {"system_accuracy": 0.5})


def test_cost_per_1000_teacher_only_routed_student_only():
    records = [{"meta": {"cost_usd": 0.002}}, {"meta": {"cost_usd": 0.004}}, {"meta": {"error": "x", "cost_usd": 9}}]
    price = teacher_price(records, usd_per_hour=0.1)
    assert price.basis == "ledger" and price.usd_per_request == pytest.approx(0.003)
    local = teacher_price([{"meta": {"cost_usd": 0.0, "latency_ms": 36000}}], usd_per_hour=0.1)
    assert local.basis == "latency" and local.usd_per_request == pytest.approx(0.001)  # 10 s at $0.10/h
    teacher, routed, student = cost_rows(teacher_usd=0.003, student_usd=0.0001, local_share=0.75)
    assert teacher.usd_per_1k == pytest.approx(3.0) and student.usd_per_1k == pytest.approx(0.1)
    assert routed.usd_per_1k == pytest.approx(0.1 + 0.25 * 3.0)
    assert routed.saving_vs_teacher == pytest.approx(1 - 0.85 / 3.0)


def test_free_text_chrf_and_rouge_l():
    from pipeline.evaluation.metrics import chrf, rouge_l, text_figures

    assert chrf("the parcel is late", "the parcel is late") == pytest.approx(1.0)
    assert rouge_l("the parcel is late", "the parcel is late") == pytest.approx(1.0)
    assert rouge_l("parcel late", "the parcel is late") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert chrf("zzzz", "the parcel is late") < 0.1
    figs = text_figures(["a b c", "x y"], ["a b c", "a b"], reps=100, seed=0)
    assert figs["rouge_l"].value == pytest.approx(0.5)
