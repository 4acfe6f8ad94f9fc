"""The field_prob signal: the weakest field's calibrated probability, named in the escalation
reason; a planted wrong value is the field the real model doubts; the per-field temperature puts a
long field (a list) on the scale of the short ones; invalid JSON stays a hard gate; and which token
signals are biased by an answer's length."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.conversation import user_turn
from pipeline.evaluation.calibration import fit_field_temperatures
from pipeline.llm.completion import Completion
from pipeline.llm.gates import Gates
from pipeline.llm.policy import Policy, signal
from pipeline.task import load_task

ROOT = Path(__file__).resolve().parents[2]
ANSWER = '{"order_id": "ORD-123456", "amount": 45.5, "items": ["kettle"]}'


def answer(field_lp: dict, text: str = ANSWER, **kw) -> Completion:
    return Completion(text=text, token_logprobs=[-0.1, -0.2], field_logprobs=field_lp, **kw)


def test_the_reason_names_the_weakest_field_and_its_calibrated_probability():
    policy = Policy(threshold=0.63, signal="field_prob")
    low = answer({"order_id": -0.05, "amount": math.log(0.41), "items": -0.3})
    decision = policy.decide(low)
    assert decision.route == "escalate" and decision.reason == "`amount` p=0.410 < threshold 0.630"
    assert decision.score == pytest.approx(0.41)
    ok = policy.decide(answer({"order_id": -0.05, "amount": -0.1, "items": -0.3}))
    assert ok.route == "student" and ok.reason == "`items` p=0.741 >= threshold 0.630"
    # Only the recipe's fields count; temperatures rescale each field (T_items = 10: p = exp(-0.3 / 10) = 0.970).
    scoped = Policy(
        threshold=0.63, signal="field_prob", fields=("order_id", "items"), field_temperatures={"items": 10.0, "*": 1.0}
    )
    assert scoped.decide(low).reason == "`order_id` p=0.951 >= threshold 0.630"
    # Round trip through router_policy.json keeps what the server needs.
    again = Policy.from_json(json.loads(json.dumps({**scoped.to_json(), "schema": {"type": "object"}})))
    assert again.fields == ("order_id", "items") and again.field_temperatures == {"items": 10.0, "*": 1.0}
    assert again.schema == {"type": "object"}


def test_invalid_json_and_a_cut_off_answer_escalate_whatever_the_fields_say():
    schema = load_task(ROOT / "data" / "extraction_task.yaml").output_schema
    policy = Policy(threshold=0.1, signal="field_prob", gates=Gates(output_schema=schema))
    sure = {"order_id": 0.0}
    assert (
        policy.decide(answer(sure, text='{"order_id": "ORD-1')).reason
        == "answer is not JSON (the task has an output_schema)"
    )
    assert policy.decide(answer(sure, text='{"order_id": "ORD-1"}')).reason.startswith(
        "answer fails the task's output_schema"
    )
    assert policy.decide(answer(sure, finish_reason="length")).reason == "answer ended by length, not by itself"
    unscored = Policy(threshold=0.1, signal="field_prob").decide(answer(None))  # e.g. an upstream without logprobs
    assert unscored.route == "escalate" and unscored.reason.startswith("no field_prob on the answer")


def test_field_temperature_puts_a_long_list_field_on_the_scale_of_the_short_ones():
    """Items (many tokens) always has the lowest raw probability although it is right 95% of the
    time; amount is right half of the time. Raw, the minimum always names items; calibrated per
    field on validation, it names amount, the field that is actually in doubt."""
    rng = np.random.default_rng(0)
    completions, references = [], []
    for _ in range(200):
        amount_right, items_right = rng.random() < 0.5, rng.random() < 0.95
        lp = {"amount": -0.4 if amount_right else -0.9, "items": -3.0 if items_right else -4.0}
        completions.append(answer(lp, text=json.dumps({"amount": 1, "items": ["a", "b", "c"]})))
        references.append(
            json.dumps({"amount": 1 if amount_right else 2, "items": ["a", "b", "c"] if items_right else ["x"]})
        )
    temps = fit_field_temperatures(completions, references)
    assert temps["items"] > 10 * temps["amount"]
    raw, calibrated = (
        Policy(threshold=0.5, signal="field_prob"),
        Policy(threshold=0.5, signal="field_prob", field_temperatures=temps),
    )
    doubtful = answer({"amount": -0.9, "items": -3.0})
    assert raw.decide(doubtful).reason.startswith("`items`")
    assert calibrated.decide(doubtful).reason.startswith("`amount`")


def test_a_planted_wrong_field_is_the_one_the_escalation_names():
    """SmolLM2 answers under the schema; its `order_id` is then replaced by one the message does
    not contain and the record re-scored teacher-forced under the same grammar: the weakest field,
    named in the reason, is the planted one."""
    import torch

    from pipeline.llm.generate import generate_batch
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.llm.structured import SchemaLogitsProcessor, decoded_pieces, field_logprobs

    task = load_task(ROOT / "data" / "extraction_task.yaml")
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    model = load_model("embedded:smollm2-135m-instruct", device_plan()).eval()
    conv = task.teacher_messages(
        user_turn("Hello, I want to send back the kettle. It cost £45.50. Order ORD-204518. Regards, Ana Silva")
    )
    (first,) = generate_batch(model, tok, [conv], 160, schema=task.output_schema)
    record = json.loads(first.text)
    assert record["order_id"] == "ORD-204518", first.text  # read right: planting makes it wrong
    planted = json.dumps({**record, "order_id": "ORD-731946"})

    def constrained_scores(text: str, ids: list[int] | None = None) -> Completion:
        prompt = tok(
            tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False), add_special_tokens=False
        )["input_ids"]
        ids = ids or tok(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
        processor, logprobs = SchemaLogitsProcessor(tok, task.output_schema), []
        for k, token in enumerate(ids):
            row = processor(torch.tensor([prompt + ids[:k]]), logits[len(prompt) - 1 + k][None].clone())
            logprobs.append(float(torch.log_softmax(row, dim=-1)[0, token]))
        return Completion(
            text=text,
            token_ids=ids,
            token_logprobs=logprobs,
            field_logprobs=field_logprobs(decoded_pieces(tok, ids), logprobs),
        )

    policy = Policy(threshold=0.5, signal="field_prob", gates=Gates(output_schema=task.output_schema))
    original = constrained_scores(first.text, first.token_ids)
    assert original.field_logprobs == pytest.approx(first.field_logprobs, abs=1e-2)  # the numbers generation gave
    wrong = constrained_scores(planted)
    decision = policy.decide(wrong)
    assert policy.decide(original).reason.split(" p=")[0] != "`order_id`"
    assert decision.route == "escalate" and decision.reason.startswith("`order_id` p="), decision.reason
    assert wrong.field_logprobs["order_id"] < original.field_logprobs["order_id"] - 3


def test_min_logprob_is_biased_by_length_and_p10_and_mean_are_not():
    """Short (4-token) and long (60-token) answers whose tokens are equally sure (the same
    distribution of log-probabilities): min_logprob scores the long ones far lower, so a threshold
    on it escalates long answers for being long; p10_logprob and mean_logprob score both alike."""
    rng = np.random.default_rng(0)

    def answers(n_tokens: int) -> list[Completion]:
        return [Completion(text="x", token_logprobs=list(-rng.exponential(0.3, n_tokens))) for _ in range(300)]

    short, long = answers(4), answers(60)
    policy = Policy(threshold=None)

    def average(name: str, group: list[Completion]) -> float:
        return float(np.mean([signal(name).score(c, policy) for c in group]))

    assert average("min_logprob", long) < average("min_logprob", short) - 0.6
    assert abs(average("p10_logprob", long) - average("p10_logprob", short)) < 0.12
    assert abs(average("mean_logprob", long) - average("mean_logprob", short)) < 0.05
