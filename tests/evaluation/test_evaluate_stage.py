"""The evaluate stage's assessment and artifacts on synthetic answers (no model): every
figure with a CI, the policy file, the report's headline table first, and the four PNGs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import validate_recipe
from pipeline.conversation import StudentView
from pipeline.llm.policy import Policy
from pipeline.stages import evaluate
from pipeline.task import load_task

ROOT = Path(__file__).resolve().parents[2]
VIEW = StudentView("user", "auto", 1, None, "auto: no system prompt in the data")


def synthetic(task, n: int, rng) -> tuple[list[dict], list, list]:
    """Rows whose teacher label is known; the tuned student is right and confident 80% of the
    time, the base student is mostly wrong."""
    from pipeline.llm.completion import Completion

    labels = task.labels
    rows, base, tuned = [], [], []
    for i in range(n):
        teacher = labels[i % len(labels)]
        right = rng.random() < 0.8
        said = teacher if right else labels[(i + 1) % len(labels)]
        logits = {label: rng.normal(-8, 1) for label in labels}
        logits[said] = -0.2 if right else -1.5
        rows.append({"id": str(i), "prompt": f"p{i}", "completion": teacher, "gold": teacher if i % 3 else labels[0]})
        tuned.append(Completion(text=said, token_logprobs=[logits[said]], label_logprobs=logits, latency_ms=5))
        base.append(Completion(text=labels[0] if i % 4 else "nonsense"))
    return rows, base, tuned


@pytest.fixture(scope="module")
def assessed(tmp_path_factory):
    task = load_task(ROOT / "data" / "task.yaml")
    recipe = validate_recipe(
        {
            "name": "t",
            "router": {"signal": "label_prob", "quality_target": 0.7},
            "eval": {"bootstrap": 200, "gate": {"tuned_agreement": 0.5}},
        },
        "test",
    )
    rng = np.random.default_rng(0)
    test, base, tuned = synthetic(task, 160, rng)
    validation, _, val = synthetic(task, 160, rng)
    records = [{"meta": {"cost_usd": 0.001}}] * 10
    result = evaluate.assess(
        recipe,
        task,
        test,
        validation,
        evaluate.Answers(base, 1.0),
        evaluate.Answers(tuned, 2.0),
        evaluate.Answers(val, 2.0),
        records,
        VIEW,
    )
    out = tmp_path_factory.mktemp("evaluate")
    evaluate.write_outputs(out, recipe, task, result, adapter_sha="abc")
    return recipe, result, out


def test_every_headline_figure_has_a_ci_and_the_threshold_meets_its_bound(assessed):
    recipe, result, _ = assessed
    figs = result["figures"]
    for name in (
        "base_agreement",
        "tuned_agreement",
        "tuned_macro_f1",
        "teacher_accuracy",
        "tuned_accuracy",
        "local_share",
        "system_agreement",
        "system_accuracy",
        "tuned_validation_agreement",
    ):
        assert figs[name].lo <= figs[name].value <= figs[name].hi, name
    validation_right = [a.text == r["completion"] for a, r in zip(result["validation_answers"], result["validation"])]
    assert figs["tuned_validation_agreement"].value == sum(validation_right) / len(validation_right)  # what sweep reads
    # The 70% most confident answers (label_prob), ranked by hand: confident == right by construction.
    scored = sorted(
        (
            (result["choice"].policy.score(a), a.text == r["completion"])
            for a, r in zip(result["tuned"], result["test"])
        ),
        key=lambda p: -p[0],
    )
    top = scored[: int(0.7 * len(scored))]
    assert result["flat"]["tuned_agreement_top70pct"] == pytest.approx(sum(ok for _, ok in top) / len(top))
    assert result["flat"]["tuned_agreement_top70pct"] > figs["tuned_agreement"].value
    assert figs["tuned_agreement"].value == pytest.approx(0.8, abs=0.08)
    choice = result["choice"]
    assert choice.reason == "met" and choice.bound >= 0.7 and 0 < figs["local_share"].value <= 1
    assert result["signals"]["signals"]["label_prob"]["auroc"] > 0.9  # confident == right, by construction
    assert result["flat"]["routed_usd_per_1k"] < result["flat"]["teacher_only_usd_per_1k"]


def test_policy_file_and_report(assessed):
    _, result, out = assessed
    policy = json.loads((out / "router_policy.json").read_text())
    assert policy["signal"] == "label_prob" and policy["adapter_sha256"] == "abc"
    assert policy["bound"] >= policy["quality_target"] and policy["labels"]
    assert Policy.load(out / "router_policy.json").threshold == policy["threshold"]
    assert policy["settings"]["temperature"] > 0 and not math.isnan(policy["settings"]["temperature"])
    md = (out / "report.md").read_text()
    assert md.splitlines()[4].startswith("| system | agreement with teacher")
    for png in ("confusion.png", "reliability.png", "risk_coverage.png", "cost_quality.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in md
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 160 and {p["route"] for p in preds} <= {"student", "escalate"}
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["tuned_agreement"] == sum(p["tuned_agrees"] for p in preds) / 160


def test_unknown_gate_figure_and_label_signal_on_free_text_fail_early():
    from pipeline.errors import DistillError

    task = load_task(ROOT / "data" / "task.yaml")
    recipe = validate_recipe({"name": "t", "eval": {"gate": {"tuned_agrement": 0.5}}}, "test")
    with pytest.raises(DistillError, match="eval.gate: unknown figure tuned_agrement"):
        evaluate._check_recipe_fits_task(recipe, task)
    free = task.model_copy(update={"kind": "generation", "labels": []})
    with pytest.raises(DistillError, match="needs a classification task"):
        evaluate._check_recipe_fits_task(validate_recipe({"name": "t", "router": {"signal": "label_prob"}}, "t"), free)
    with pytest.raises(DistillError, match="router.decode=label_posterior answers with one of the task's labels"):
        evaluate._check_recipe_fits_task(
            validate_recipe({"name": "t", "router": {"decode": "label_posterior"}}, "t"), free
        )


def test_the_policy_file_carries_the_recipes_decoding(tmp_path):
    """What evaluate decoded with is what serve decodes with: the policy file says which."""
    task = load_task(ROOT / "data" / "task.yaml")
    recipe = validate_recipe(
        {
            "name": "t",
            "router": {"signal": "label_prob", "quality_target": 0.7, "decode": "label_posterior"},
            "eval": {"bootstrap": 100},
        },
        "t",
    )
    rng = np.random.default_rng(1)
    test, base, tuned = synthetic(task, 160, rng)
    validation, _, val = synthetic(task, 160, rng)
    result = evaluate.assess(
        recipe,
        task,
        test,
        validation,
        evaluate.Answers(base, 1.0),
        evaluate.Answers(tuned, 2.0),
        evaluate.Answers(val, 2.0),
        [{"meta": {"cost_usd": 0.001}}] * 10,
        StudentView("conversation", "auto", 7, None, "auto: 7 distinct system prompts"),
    )
    evaluate.write_outputs(tmp_path, recipe, task, result, adapter_sha="abc")
    policy = Policy.load(tmp_path / "router_policy.json")
    assert (policy.decode, policy.student_input) == ("label_posterior", "conversation")
    assert "conversation" in json.loads((tmp_path / "router_policy.json").read_text())["settings"]["prompt_form"]


def free_text(n: int, rng) -> tuple[list[dict], list, list]:
    """Free-text rows: the tuned student copies the teacher when its weakest token is sure, and
    every 10th answer is a refusal (confident, but gated)."""
    from pipeline.llm.completion import Completion

    rows, base, tuned = [], [], []
    for i in range(n):
        weakest = float(rng.uniform(-5, 0))
        right = rng.random() < 1 / (1 + math.exp(-(3 * weakest + 6)))
        said = "Sorry, I cannot help." if i % 10 == 0 else (f"answer {i}" if right else f"other {i}")
        rows.append({"id": str(i), "prompt": f"p{i}", "completion": f"answer {i}"})
        tuned.append(Completion(text=said, token_logprobs=[-0.02] * 5 + [weakest if i % 10 else -0.01], latency_ms=5))
        base.append(Completion(text="base"))
    return rows, base, tuned


def test_free_text_routes_on_a_logistic_signal_fitted_on_half_of_validation(tmp_path):
    from pipeline.task import Task

    task = Task(name="free", kind="generation", instructions="Answer.")
    recipe = validate_recipe(
        {"name": "t", "router": {"signal": "logistic", "quality_target": 0.8}, "eval": {"bootstrap": 200}}, "test"
    )
    rng = np.random.default_rng(1)
    test, base, tuned = free_text(300, rng)
    validation, _, val = free_text(300, rng)
    result = evaluate.assess(
        recipe,
        task,
        test,
        validation,
        evaluate.Answers(base, 1.0),
        evaluate.Answers(tuned, 2.0),
        evaluate.Answers(val, 2.0),
        [],
        VIEW,
    )
    evaluate.write_outputs(tmp_path, recipe, task, result, adapter_sha="abc")
    policy = json.loads((tmp_path / "router_policy.json").read_text())
    assert policy["signal"] == "logistic" and policy["weights"]["min_logprob"] > 0
    assert policy["examples"] == 150 and "odd rows" in policy["chosen_on"]  # chosen on the half not fitted on
    assert policy["gates"]["refusal_patterns"] and policy["reason"] == "met"
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    refusals = [p for p in preds if p["tuned"].startswith("Sorry")]
    assert refusals and {p["route"] for p in refusals} == {"escalate"}
    assert all("refusal" in p["route_reason"] for p in refusals)
    assert result["signals"]["signals"]["logistic"]["auroc"] > 0.85
    assert "Logistic weights" in (tmp_path / "report.md").read_text()


def test_report_says_an_nf4_trained_adapter_is_evaluated_on_the_unquantised_base():
    from pipeline.evaluation.render import base_weight_lines

    weights = evaluate.base_weights(1.0, "bfloat16")
    assert weights == {
        "trained_against": "NF4 4-bit (bitsandbytes)",
        "evaluated_on": "unquantised bfloat16",
        "same": False,
    }
    line = base_weight_lines({"base_weights": weights})[0]
    assert "trained against the NF4 4-bit (bitsandbytes) base" in line and "unquantised bfloat16 base" in line
    assert evaluate.base_weights(None, "float32")["trained_against"] == "not recorded"  # an older finetune manifest


# ---------------------------------------------------------------- the teacher priced as a paid API


def test_teacher_priced_as_an_api_gives_the_hand_computed_dollars_per_thousand(tmp_path):
    """gpt-4o-mini lists $0.15 / $0.60 per 1M tokens in/out (pipeline/prices.yaml). 400 prompt and 10
    completion tokens a request: 400 * 0.15e-6 + 10 * 0.60e-6 = $0.000066, $0.066 per 1,000."""
    task = load_task(ROOT / "data" / "task.yaml")
    recipe = validate_recipe(
        {
            "name": "t",
            "router": {"signal": "label_prob", "quality_target": 0.7},
            "eval": {
                "bootstrap": 200,
                "cost": {"teacher_priced_as": "openai:gpt-4o-mini", "student_usd_per_hour": 0.36},
            },
        },
        "test",
    )
    rng = np.random.default_rng(0)
    test, base, tuned = synthetic(task, 160, rng)
    validation, _, val = synthetic(task, 160, rng)
    usage = {"prompt_tokens": 400, "completion_tokens": 10}
    records = [{"id": str(i), "meta": {"latency_ms": 100, "usage": usage}} for i in range(160)]
    result = evaluate.assess(
        recipe,
        task,
        test,
        validation,
        evaluate.Answers(base, 1.0),
        evaluate.Answers(tuned, 16.0),
        evaluate.Answers(val, 2.0),
        records,
        VIEW,
    )
    api, flat = result["cost"]["priced_as"], result["flat"]
    assert api["teacher_usd_per_1k"] == pytest.approx(0.066)
    student = 16.0 / 160 * 0.36 / 3600  # measured: 16 s for 160 answers at $0.36/h
    share = result["figures"]["local_share"]
    assert flat["priced_routed_usd_per_1k"] == pytest.approx(1000 * (student + (1 - share.value) * 0.000066))
    assert flat["priced_routed_usd_per_1k_lo"] == pytest.approx(1000 * (student + (1 - share.hi) * 0.000066))
    assert flat["priced_saving"] == pytest.approx(1 - flat["priced_routed_usd_per_1k"] / 0.066)
    assert flat["priced_saving_lo"] <= flat["priced_saving"] <= flat["priced_saving_hi"]
    evaluate.write_outputs(tmp_path, recipe, task, result, adapter_sha="abc")
    report = (tmp_path / "report.md").read_text()
    assert (
        "**Priced as openai:gpt-4o-mini**" in report and "| openai:gpt-4o-mini for every request | $0.0660 |" in report
    )


def test_the_api_price_is_the_test_traffics_whatever_the_capture_holds():
    """A loop's rounds share one frozen test split but not a capture (round N's is its training pool):
    pricing the capture moved the teacher-only figure between rounds. The test split's requests are
    priced, each with the teacher's own count where the capture recorded one."""
    task = load_task(ROOT / "data" / "task.yaml")
    recipe = validate_recipe(
        {
            "name": "t",
            "router": {"signal": "label_prob"},
            "eval": {"bootstrap": 200, "cost": {"teacher_priced_as": "openai:gpt-4o-mini"}},
        },
        "test",
    )
    rng = np.random.default_rng(0)
    test, base, tuned = synthetic(task, 40, rng)
    validation, _, val = synthetic(task, 40, rng)

    def prompt_chars(record: dict) -> tuple[int, int]:  # a stand-in tokenizer: one token per character
        return len(record["messages"][0]["content"]), 1

    def teacher_1k(records: list[dict]) -> float:
        answers = (evaluate.Answers(base, 1.0), evaluate.Answers(tuned, 4.0), evaluate.Answers(val, 1.0))
        result = evaluate.assess(recipe, task, test, validation, *answers, records, VIEW, prompt_chars)
        return result["cost"]["priced_as"]["teacher_usd_per_1k"]

    mean_prompt = sum(len(row["prompt"]) for row in test) / len(test)  # "p0" .. "p39"
    counted = 1000 * (mean_prompt * 0.15e-6 + 1 * 0.60e-6)
    long_pool = [
        {"id": f"x{i}", "messages": [], "meta": {"usage": {"prompt_tokens": 900, "completion_tokens": 50}}}
        for i in range(9)
    ]
    assert teacher_1k([]) == pytest.approx(counted)
    assert teacher_1k(long_pool) == pytest.approx(counted)  # another capture, the same price
    recorded = [{"id": row["id"], "meta": {"usage": {"prompt_tokens": 400, "completion_tokens": 10}}} for row in test]
    assert teacher_1k(recorded) == pytest.approx(0.066)  # the teacher's own count wins where it has one


def test_records_without_usage_are_priced_by_the_student_tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    from pipeline.evaluation.cost import api_price_figures
    from pipeline.prices import Price

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    record = {
        "messages": [
            {"role": "user", "content": "where is my parcel"},
            {"role": "assistant", "content": "track_order"},
        ],
        "meta": {},
    }
    prompt, completion = evaluate.record_token_counter(tokenizer)(record)
    rendered = tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True)
    assert prompt == len(rendered if isinstance(rendered, list) else rendered["input_ids"])
    assert completion == len(tokenizer("track_order", add_special_tokens=False)["input_ids"]) + 1
    api = api_price_figures(
        [record], "x:y", Price(1.0, 2.0, "recipe"), 0.0, 0.5, 0.4, 0.6, evaluate.record_token_counter(tokenizer)
    )
    assert api["tokens"] == "counted with the student's tokenizer"
    assert api["teacher_usd_per_1k"] == pytest.approx(1000 * (prompt * 1.0 + completion * 2.0) / 1e6)
    assert api_price_figures([record], "x:y", Price(1.0, 2.0, "recipe"), 0.0, 0.5, 0.4, 0.6) is None


def test_an_unknown_api_name_fails_validation_with_the_nearest_names():
    from pipeline.errors import DistillError

    with pytest.raises(
        DistillError,
        match=r"eval.cost.teacher_priced_as: 'openai:gpt-4o-mni' is not in "
        r"pipeline/prices.yaml \(did you mean 'openai:gpt-4o-mini'",
    ):
        validate_recipe({"name": "t", "eval": {"cost": {"teacher_priced_as": "openai:gpt-4o-mni"}}}, "r.yaml")
    priced = validate_recipe(
        {
            "name": "t",
            "eval": {
                "cost": {"teacher_priced_as": "acme:big", "teacher_price": {"input_per_mtok": 1, "output_per_mtok": 2}}
            },
        },
        "r.yaml",
    )
    assert priced.eval.cost.teacher_price.output_per_mtok == 2
