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
    field_prf,
    macro_f1,
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


def test_json_field_f1():
    ref = '{"name": "Ann", "city": "Oslo", "order": {"id": 7}}'
    assert field_prf(ref, ref) == (1.0, 1.0, 1.0)
    p, r, f = field_prf('{"name": "Ann", "city": "Bergen"}', ref)
    assert (p, r) == (0.5, pytest.approx(1 / 3)) and f == pytest.approx(0.4)
    assert field_prf("not json", ref) == (0.0, 0.0, 0.0)


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
