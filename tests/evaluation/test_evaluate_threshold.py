"""The threshold with a guarantee: Clopper-Pearson fixed-sequence choice on synthetic scores
with a known answer, escalate-everything, too-few examples, temperature and AUROC."""

import math

import numpy as np
import pytest

from pipeline.evaluation.calibration import auroc, fit_temperature, reliability
from pipeline.evaluation.threshold import choose_threshold, measure, sweep
from pipeline.llm.completion import Completion
from pipeline.llm.policy import Policy, replay
from pipeline.stats import clopper_pearson_lower, examples_needed


def answer(mean: float | None) -> Completion:
    return Completion(text="x", token_logprobs=None if mean is None else [mean])


def test_clopper_pearson_known_values_and_examples_needed():
    # k = n: the one-sided bound is (1 - confidence) ** (1 / n)
    assert clopper_pearson_lower(30, 30, 0.95) == pytest.approx(0.05 ** (1 / 30))
    assert clopper_pearson_lower(0, 10) == 0.0
    assert examples_needed(0.9, 0.95) == 29  # 0.05 ** (1/29) = 0.9019 >= 0.9 > 0.05 ** (1/28)
    assert clopper_pearson_lower(29, 29) >= 0.9 > clopper_pearson_lower(28, 28)


def test_threshold_keeps_the_confident_block_that_supports_the_target():
    # 100 answers: the 60 most confident all agree, the 40 below agree half the time.
    scores = list(np.linspace(0, -1, 100))
    agree = [True] * 60 + [i % 2 == 0 for i in range(40)]
    choice = choose_threshold([answer(s) for s in scores], agree, target=0.9)
    assert choice.reason == "met" and choice.bound >= 0.9
    n = choice.answered
    # The known answer: the largest prefix whose exact bound is >= 0.9 before the first failure.
    expected = max(
        k for k in range(29, 101) if all(clopper_pearson_lower(sum(agree[:j]), j) >= 0.9 for j in range(29, k + 1))
    )
    assert n == expected and 60 <= n < 100
    assert choice.policy.threshold == scores[n - 1]
    on = measure(choice.policy, [answer(s) for s in scores], agree)
    assert on.answered == n and on.coverage == n / 100
    assert on.system_agreement == (on.agreeing + 100 - n) / 100


def test_target_not_met_escalates_everything_through_the_served_policy(tmp_path):
    answers = [answer(-i / 100) for i in range(60)]
    choice = choose_threshold(answers, [i % 2 == 0 for i in range(60)], target=0.9)
    assert choice.policy.threshold is None and choice.reason == "target_not_met"
    path = tmp_path / "router_policy.json"
    import json

    path.write_text(json.dumps({**choice.policy.to_json(), **choice.to_json()}))
    served = Policy.load(path)
    assert {d.route for d in replay(served, answers + [answer(0.0)])} == {"escalate"}
    assert measure(served, answers, [True] * 60).coverage == 0.0


def test_too_few_calibration_examples_is_said_with_the_number_needed():
    answers = [answer(-i / 100) for i in range(20)]
    choice = choose_threshold(answers, [True] * 20, target=0.9)
    assert choice.policy.threshold is None
    assert choice.reason == "too_few_examples" and choice.examples_needed == 29 and choice.examples == 20


def test_ties_are_answered_together():
    answers = [answer(0.0)] * 40 + [answer(-1.0)] * 40
    choice = choose_threshold(answers, [True] * 40 + [True] * 39 + [False], target=0.9)
    assert choice.policy.threshold == -1.0 and choice.answered == 80
    rows = sweep([0.0] * 40 + [-1.0] * 40, [True] * 79 + [False])
    assert [r["coverage"] for r in rows] == [0.5, 1.0]


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    labels, true_t = ["a", "b", "c"], 2.5
    completions, targets = [], []
    for _ in range(2000):
        logits = rng.normal(0, 3, size=3)
        p = np.exp(logits / true_t) / np.exp(logits / true_t).sum()
        completions.append(Completion(text="a", label_logprobs=dict(zip(labels, logits.tolist()))))
        targets.append(labels[rng.choice(3, p=p)])
    assert fit_temperature(completions, targets) == pytest.approx(true_t, rel=0.15)
    assert fit_temperature([Completion(text="a")], ["a"]) == 1.0


def test_auroc_and_reliability():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([None, 0.8, 0.2], [False, True, False]) == 1.0  # no signal ranks lowest
    assert auroc([0.5, 0.4], [True, True]) is None
    rel = reliability([0.95, 0.95, 0.15, 0.15], [True, True, False, True])
    assert rel["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * abs(0.15 - 0.5))
    assert math.isclose(sum(b["n"] for b in rel["bins"]), 4)
