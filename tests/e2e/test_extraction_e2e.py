"""The extraction recipe end to end at tiny size: recipes/extraction-cpu.yaml with the tiny random
Llama as teacher and student (both decoding under the task's schema), through capture, curate,
finetune, evaluate and export; then served through the real router with the openai SDK.

A random model's answers are meaningless but schema-valid by construction, which is what this
checks: every stage handles records, the field metrics and the field_prob policy are written,
every served answer parses and validates, and an escalation names the field it doubts. The
planted-field test uses the embedded SmolLM2, whose confidence means something.
"""

import asyncio
import json
import math
from pathlib import Path

import jsonschema
import pytest

from pipeline.cli import main
from pipeline.task import load_task

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "data" / "extraction_task.yaml"


def overrides(folder: Path, model: Path) -> list[str]:
    return [
        f"model.base={model}",
        f"model.chat_template={ROOT / 'recipes' / 'templates' / 'chatml.jinja'}",
        f"teacher.spec=local:{model}",
        f"capture.prompts={ROOT / 'data' / 'extraction_prompts.jsonl'}",
        f"capture.task={TASK}",
        "capture.limit=48",
        f"capture.cache={folder / 'cache.sqlite'}",
        "curate.min_examples=10",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.eos_check=warn",
        "eval.limit=10",
        "eval.bootstrap=100",
        "export.verify_prompts=1",
        "export.parity_limit=4",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("extraction")
    runs = folder / "runs"
    assert main(["run", "extraction-cpu", *overrides(folder, tiny_llama_dir), "--runs-dir", str(runs)]) == 0
    return runs / "extraction-cpu"


@pytest.fixture(scope="module")
def schema():
    return load_task(TASK).output_schema


def test_every_captured_answer_is_a_schema_valid_record(run, schema):
    records = [json.loads(line) for line in (run / "capture" / "teacher.jsonl").read_text().splitlines()]
    assert len(records) == 48
    for record in records:
        jsonschema.validate(json.loads(record["messages"][-1]["content"]), schema)
        assert record["meta"]["gold"]["request_type"]  # the gold record, as the prompts file holds it
    test_rows = [json.loads(line) for line in (run / "curate" / "test.jsonl").read_text().splitlines()]
    assert all(json.loads(row["meta"]["gold"])["request_type"] for row in test_rows)  # curate keeps it as JSON text
    counts = json.loads((run / "curate" / "manifest.json").read_text())["counts"]
    assert "removed_invalid_json" not in counts and "removed_schema_mismatch" not in counts  # valid by construction


def test_curate_validates_recorded_answers_against_the_schema_and_counts_the_drops(run, tiny_llama_dir, tmp_path):
    """Answers from elsewhere (capture.records: logs, an unconstrained teacher) are checked with
    jsonschema: one that is not JSON and one that breaks the schema are dropped and counted."""
    records = [json.loads(line) for line in (run / "capture" / "teacher.jsonl").read_text().splitlines()]
    bad_json = {
        **records[0],
        "id": "bad-json",
        "messages": [
            {"role": "user", "content": records[0]["messages"][0]["content"] + " (again)"},
            {"role": "assistant", "content": '{"order_id": '},
        ],
    }
    wrong = json.loads(records[1]["messages"][-1]["content"]) | {"request_type": "complaint"}
    bad_schema = {
        **records[1],
        "id": "bad-schema",
        "messages": [
            {"role": "user", "content": records[1]["messages"][0]["content"] + " (again)"},
            {"role": "assistant", "content": json.dumps(wrong)},
        ],
    }
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*records, bad_json, bad_schema]))
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "curate",
                "extraction-cpu",
                *overrides(tmp_path, tiny_llama_dir),
                f"capture.records={path}",
                "--runs-dir",
                str(runs),
            ]
        )
        == 0
    )
    counts = json.loads((runs / "extraction-cpu" / "curate" / "manifest.json").read_text())["counts"]
    assert counts["removed_invalid_json"] == 1 and counts["removed_schema_mismatch"] == 1, counts
    assert counts["kept"] == len(records)
    assert "schema_mismatch" in (runs / "extraction-cpu" / "curate" / "card.md").read_text()


def test_evaluate_reports_field_metrics_with_cis_and_a_field_prob_policy(run, schema):
    report = json.loads((run / "evaluate" / "report.json").read_text())
    figures = report["figures"]
    for name in (
        "tuned_field_f1",
        "tuned_exact_match",
        "tuned_schema_valid_rate",
        "tuned_gold_field_f1",
        "teacher_gold_field_f1",
        "base_field_f1",
        "local_share",
    ):
        assert figures[name]["lo"] <= figures[name]["value"] <= figures[name]["hi"], name
    assert figures["tuned_schema_valid_rate"]["value"] == 1.0  # decoded under the schema
    assert set(report["detail"]["per_field"]) == set(schema["properties"])
    md = (run / "evaluate" / "report.md").read_text()
    assert "| system | exact match vs teacher | field F1 vs teacher" in md and "## Per field" in md
    policy = json.loads((run / "evaluate" / "router_policy.json").read_text())
    assert policy["signal"] == "field_prob" and policy["schema"] == schema
    assert policy["fields"] == ["order_id", "customer_name", "contact_email"]
    assert set(policy["field_temperatures"]) >= {"*"}
    preds = [json.loads(line) for line in (run / "evaluate" / "predictions.jsonl").read_text().splitlines()]
    assert all(set(p["tuned_field_logprobs"]) == set(schema["properties"]) for p in preds)


def test_export_parity_reports_schema_validity_of_the_merged_model(run):
    parity = json.loads((run / "export" / "parity.json").read_text())
    merged = next(a for a in parity["artifacts"] if a["artifact"] == "merged")
    assert merged["schema_valid_rate"] == 1.0
    assert "schema-valid" in (run / "export" / "parity.md").read_text()


def test_served_answers_validate_and_escalations_name_the_weakest_field(run, schema, tmp_path):
    """The exported student behind the real router (openai SDK), decoding under the policy's schema:
    served by the student, every answer validates; at a threshold no answer meets, every request
    escalates to the local teacher (whose answers validate too) and the reason names the field whose
    value tokens the answer's own log-probabilities show to be least likely."""
    from dataclasses import replace

    from support.router_helpers import client, running

    from pipeline.config import TeacherConfig
    from pipeline.llm.policy import Policy
    from pipeline.llm.structured import field_logprobs, weakest_field
    from pipeline.router.app import create_app
    from pipeline.router.backends import StudentBackend, TeacherBackend
    from pipeline.router.modes import Mode
    from pipeline.router.settings import ServeSettings

    policy = Policy.load(run / "evaluate" / "router_policy.json")
    policy = replace(policy, threshold=1.01, fields=None)  # p <= 1: every answer escalates
    model_dir = run / "export" / "merged"
    student = StudentBackend(model_dir, schema=policy.schema)
    teacher = TeacherBackend(
        TeacherConfig(spec=f"local:{model_dir}", max_new_tokens=200), load_task(TASK), tmp_path / "cache.sqlite"
    )
    app = create_app(
        ServeSettings(max_tokens=200, mode=Mode.parse("live"), deadline_s=300),
        {"distill-student": student},
        policy,
        teacher=teacher,
    )
    prompts = [
        json.loads(line)["prompt"]
        for line in (ROOT / "data" / "extraction_prompts.jsonl").read_text().splitlines()[100:104]
    ]
    local = create_app(
        ServeSettings(max_tokens=200, mode=Mode.parse("live"), deadline_s=300),
        {"distill-student": student},
        replace(policy, threshold=-math.inf),
    )  # never escalates
    with running(local) as url:
        for prompt in prompts:
            raw = client(url).chat.completions.with_raw_response.create(
                model="distill-student", messages=[{"role": "user", "content": prompt}], max_tokens=200
            )
            assert raw.headers["x-distill-route"] == "student"
            jsonschema.validate(json.loads(raw.parse().choices[0].message.content), schema)
    with running(app) as url:
        for prompt in prompts:
            raw = client(url).chat.completions.with_raw_response.create(
                model="distill-student", messages=[{"role": "user", "content": prompt}], max_tokens=200
            )
            reply = raw.parse()
            jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
            assert raw.headers["x-distill-route"] == "teacher"
            assert reply.distill["reason"].startswith("`") and "` p=" in reply.distill["reason"]

    # The student's own answers, as the router read them: the reason names their weakest field.
    async def answer_locally() -> list:
        asks = [student.complete([{"role": "user", "content": p}], 200, top_logprobs=0) for p in prompts]
        return list(await asyncio.gather(*asks))

    served = asyncio.run(answer_locally())
    for answer in served:
        tokens = answer.tokens
        found = weakest_field(
            field_logprobs([t.token for t in tokens], [t.logprob for t in tokens]), policy.field_temperatures
        )
        decision = policy.decide(answer)
        assert decision.route == "escalate"
        assert decision.reason == f"`{found[0]}` p={found[1]:.3f} < threshold 1.010"
        jsonschema.validate(json.loads(answer.text), schema)
