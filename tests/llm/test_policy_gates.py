"""Hard gates and the length-unbiased / logistic signals: what the router escalates whatever the
score, read the same by evaluation's replay and by the server (one Policy, one file)."""

from __future__ import annotations

import json
import math
import random

import pytest

from pipeline.errors import DistillError
from pipeline.evaluation import calibration
from pipeline.evaluation.threshold import choose_threshold, scores_of
from pipeline.llm.completion import Completion
from pipeline.llm.gates import Gates
from pipeline.llm.policy import Policy, logprob_quantile
from pipeline.task import Task

CONFIDENT = [-0.01, -0.02]


def said(text: str, logprobs=CONFIDENT, finish: str = "stop") -> Completion:
    return Completion(text=text, token_logprobs=list(logprobs), finish_reason=finish)


def test_confident_answers_failing_a_gate_escalate_with_the_reason():
    gates = Gates(answer_regex=r"[A-Z]{3}-\d+", refusal_patterns=(r"\bI can(?:no|')t\b",))
    policy = Policy(threshold=-1.0, gates=gates)
    assert policy.decide(said("ABC-12")).route == "student"
    for text, reason in (("abc-12", "answer_regex"), ("ABC-12 maybe", "answer_regex")):
        decision = policy.decide(said(text))
        assert (decision.route, reason in decision.reason) == ("escalate", True)
    refusal = Policy(threshold=-1.0, gates=Gates(refusal_patterns=(r"\bI can(?:no|')t\b",)))
    decision = refusal.decide(said("Sorry, I can't help with that."))
    assert decision.route == "escalate" and "refusal" in decision.reason
    assert refusal.decide(said("Your order ships Monday.")).route == "student"


def test_schema_gate_escalates_unparsable_and_invalid_json():
    schema = {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]}
    policy = Policy(threshold=-1.0, gates=Gates(output_schema=schema))
    assert policy.decide(said('{"order": "A1"}')).route == "student"
    assert "not JSON" in policy.decide(said('{"order": ')).reason
    assert "output_schema" in policy.decide(said('{"order": 7}')).reason
    assert policy.decide(said('{"id": "A1"}')).route == "escalate"


def test_a_classification_answer_that_is_no_label_escalates_under_any_signal():
    policy = Policy(threshold=-1.0, signal="mean_logprob", labels=("track_order", "return_item"))
    assert policy.decide(said("Track order.")).route == "student"  # folded like Task.normalize_label
    decision = policy.decide(said("joke"))
    assert decision.route == "escalate" and "not one of the task's labels" in decision.reason
    assert policy.score(said("joke")) is None  # so threshold choice never counts it as answered


def test_gates_come_from_the_task_and_survive_the_policy_file(tmp_path):
    task = Task(name="t", kind="generation", instructions="Answer.", answer_regex=r"\w+")
    gates = Gates.for_task(task, [r"\bsorry\b"])
    policy = Policy(threshold=-0.5, signal="p10_logprob", gates=gates)
    path = tmp_path / "router_policy.json"
    path.write_text(json.dumps(policy.to_json()))
    loaded = Policy.load(path)
    assert loaded == policy
    assert loaded.decide(said("so sorry")).route == "escalate"  # fails the regex and reads as a refusal
    assert loaded.decide(said("fine")).route == "student"
    classification = Task(name="c", instructions="Pick.", labels=["a", "b"])
    assert Gates.for_task(classification, [r"\bsorry\b"]).refusal_patterns == ()  # labels gate it instead
    assert Policy.from_json({"threshold": -1.0}).gates == Gates()  # a policy file from before gates


def test_p10_logprob_is_a_low_quantile_that_one_odd_token_does_not_decide():
    values = [-0.01] * 19 + [-6.0]
    assert logprob_quantile(said("x", values), 0.1) == -0.01
    assert logprob_quantile(said("x", [-3.0, -1.0, -2.0]), 0.1) == -3.0
    policy = Policy(threshold=-0.5, signal="p10_logprob")
    assert policy.decide(said("long answer", values)).route == "student"
    assert Policy(threshold=-0.5, signal="min_logprob").decide(said("long answer", values)).route == "escalate"
    assert policy.decide(Completion(text="x", token_logprobs=None)).route == "escalate"


def synthetic(n: int, seed: int) -> tuple[list[Completion], list[bool]]:
    """Agreement driven by the weakest token: a signal only min/p10 can see, mean hides."""
    rng = random.Random(seed)
    answers, agree = [], []
    for _ in range(n):
        weakest = rng.uniform(-4.0, 0.0)
        answers.append(said("a", [-0.05] * 9 + [weakest]))
        agree.append(rng.random() < 1 / (1 + math.exp(-(3 * weakest + 6))))
    return answers, agree


def test_logistic_fit_learns_the_weakest_token_and_ranks_agreement():
    answers, agree = synthetic(400, seed=1)
    weights = calibration.fit_logistic(answers, agree)
    assert weights["min_logprob"] > 0.5  # agreement rises with the weakest token's log-probability
    test, test_agree = synthetic(400, seed=2)
    policy = Policy(threshold=None, signal="logistic", weights=weights)
    assert calibration.auroc(scores_of(test, policy), test_agree) > 0.75
    mean_only = Policy(threshold=None, signal="mean_logprob")
    assert (
        calibration.auroc(scores_of(test, policy), test_agree)
        >= calibration.auroc(scores_of(test, mean_only), test_agree) - 0.02
    )
    assert all(0 < s < 1 for s in scores_of(test, policy))


def test_logistic_needs_weights_and_all_agreeing_has_nothing_to_fit():
    with pytest.raises(DistillError, match="needs its fitted weights"):
        Policy(threshold=0.5, signal="logistic")
    answers, _ = synthetic(20, seed=3)
    assert calibration.fit_logistic(answers, [True] * 20) is None
    assert Policy.student_only("logistic").signal == "mean_logprob"
    assert Policy.student_only("label_prob").signal == "mean_logprob"  # labels come only with an evaluated policy


def test_threshold_choice_never_answers_a_gated_answer():
    # 60 confident answers agreeing, but 20 of them are refusals: the gate escalates them, so the
    # chosen threshold answers only the 40 that pass and the measured coverage says so.
    answers = [said("fine") for _ in range(40)] + [said("I cannot do that") for _ in range(20)]
    template = Policy(threshold=None, gates=Gates(refusal_patterns=(r"\bcannot\b",)))
    choice = choose_threshold(answers, [True] * 60, target=0.9, template=template)
    assert choice.reason == "met" and choice.answered == 40
    assert choice.policy.gates == template.gates
    assert [choice.policy.decide(a).route for a in answers].count("student") == 40
