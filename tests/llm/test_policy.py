"""One routing rule: evaluation chooses and replays it, the server applies it; no threshold fails closed."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.errors import DistillError
from pipeline.evaluation.threshold import choose_threshold, measure
from pipeline.llm.completion import Completion
from pipeline.llm.policy import Policy, replay


def answer(mean: float | None) -> Completion:
    return Completion(text="x", token_logprobs=None if mean is None else [mean])


def test_no_threshold_escalates_everything():
    policy = Policy(threshold=None)
    assert {policy.decide(answer(v)).route for v in (0.0, -0.1, -5.0, None)} == {"escalate"}


def test_threshold_splits_on_the_signal_and_missing_signal_escalates():
    policy = Policy(threshold=-1.0)
    assert policy.decide(answer(-0.5)).route == "student"
    assert policy.decide(answer(-1.0)).route == "student"
    assert policy.decide(answer(-1.5)).route == "escalate"
    assert policy.decide(answer(None)).route == "escalate"


def test_student_only_never_escalates_and_is_never_written():
    policy = Policy.student_only()
    assert {policy.decide(answer(v)).route for v in (0.0, -50.0, None)} == {"student"}
    with pytest.raises(DistillError):
        policy.to_json()


def test_unknown_signal_is_refused_at_construction():
    with pytest.raises(DistillError, match="unknown router signal 'margin'"):
        Policy(threshold=0.0, signal="margin")


def test_policy_round_trips_through_its_file(tmp_path):
    path = tmp_path / "router_policy.json"
    path.write_text(json.dumps({**Policy(threshold=-0.7, quality_target=0.9).to_json(), "coverage": 0.5}))
    assert Policy.load(path) == Policy(threshold=-0.7, quality_target=0.9)
    path.write_text(json.dumps({"threshold": None}))
    assert Policy.load(path).threshold is None
    path.write_text("{not json")
    with pytest.raises(DistillError, match="not a router policy"):
        Policy.load(path)


def test_chosen_threshold_replays_as_the_server_decides():
    confidences = [-i / 100 for i in range(45)]
    correct = [True] * 40 + [False] * 5  # the 40 most confident agree: bound 0.05 ** (1/40) = 0.928
    answers = [answer(c) for c in confidences]
    choice = choose_threshold(answers, correct, target=0.9)
    assert choice.policy.threshold == -0.39 and choice.answered == 40
    on = measure(choice.policy, answers, correct)
    assert on.coverage == 40 / 45 and on.agreement_answered == 1.0
    assert [d.route for d in replay(choice.policy, answers)] == ["student"] * 40 + ["escalate"] * 5


def test_unreachable_target_gives_no_threshold_and_zero_coverage():
    answers = [answer(-0.1), answer(-0.2)]
    choice = choose_threshold(answers, [False, False], target=0.9)
    assert choice.policy.threshold is None
    assert measure(choice.policy, answers, [False, False]).coverage == 0.0


def test_label_policy_round_trips_and_says_it_needs_label_scores(tmp_path):
    policy = Policy(threshold=0.8, signal="label_prob", quality_target=0.9, labels=("a", "b"), temperature=1.7)
    path = tmp_path / "router_policy.json"
    path.write_text(json.dumps(policy.to_json()))
    loaded = Policy.load(path)
    assert loaded == policy and loaded.needs_label_scores and list(loaded.labels) == ["a", "b"]
    with pytest.raises(DistillError, match="needs the task's labels"):
        Policy(threshold=0.8, signal="label_margin")


def test_completion_round_trips_through_json():
    c = Completion(text="refund", prompt_tokens=12, completion_tokens=2, cost_usd=0.01, token_logprobs=[-0.25])
    assert (c.prompt_tokens, c.completion_tokens, c.mean_logprob, c.cost_usd) == (12, 2, -0.25, 0.01)
    assert Completion.from_json(c.to_json()) == c
    assert Completion(text="", token_logprobs=[-math.inf]).mean_logprob is None
    assert Completion(text="").usage == {}


def test_an_answer_cut_off_at_the_token_limit_escalates_unless_student_only():
    cut = Completion(text="x", token_logprobs=[-0.01], finish_reason="length")
    assert Policy(threshold=-1.0).decide(cut).route == "escalate"
    assert Policy.student_only().decide(cut).route == "student"
