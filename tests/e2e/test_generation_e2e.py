"""The free-text recipe end to end at tiny size: recipes/summary-cpu.yaml's task (one-sentence
summaries, gold sentences beside the messages) with the embedded SmolLM2 as teacher and judge and a
tiny random student, through capture, curate, finetune, evaluate and export; then served through
the real router with the openai SDK on the p10_logprob signal."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
TEACHER = "local:embedded:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("generation")
    recipe = yaml.safe_load((ROOT / "recipes" / "summary-cpu.yaml").read_text())
    recipe["model"] = {
        "base": str(tiny_llama_dir),
        "chat_template": str(ROOT / "recipes" / "templates" / "chatml.jinja"),
    }
    recipe["teacher"].update(max_new_tokens=40)  # a sentence; cut ones are dropped by curate
    recipe["capture"].update(
        prompts=str(ROOT / "data" / "extraction_prompts.jsonl"),
        task=str(ROOT / "data" / "summary_task.yaml"),
        limit=24,
        cache=str(folder / "cache.sqlite"),
    )
    recipe["curate"]["min_examples"] = 8
    recipe["train"].update(max_steps=2, batch_size=4, eos_check="warn")
    # The judge is the embedded SmolLM2 too: its verdicts need only parse, not be wise, here.
    recipe["eval"] = {
        "max_new_tokens": 12,
        "limit": 8,
        "bootstrap": 100,
        "judge": {"spec": TEACHER, "max_new_tokens": 3},
    }
    recipe["export"].update(verify_prompts=1, verify_max_new_tokens=4, parity_limit=4)
    recipe["tracking"] = {"uri": f"sqlite:///{folder / 'mlflow.db'}"}
    path = folder / "summary-cpu.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = folder / "runs"
    assert main(["run", str(path), "--runs-dir", str(runs)]) == 0
    return runs / "summary-cpu"


def test_captured_summaries_carry_their_gold_sentence(run):
    records = [json.loads(line) for line in (run / "capture" / "teacher.jsonl").read_text().splitlines()]
    assert len(records) == 24
    assert all(r["messages"][-1]["content"].strip() and r["meta"]["gold"] for r in records)


def test_evaluate_reports_text_overlap_and_the_judge_with_its_parse_rate(run):
    report = json.loads((run / "evaluate" / "report.json").read_text())
    figures = report["figures"]
    for name in ("tuned_chrf", "base_chrf", "tuned_rouge_l", "tuned_judge_win_rate", "judge_parse_rate", "local_share"):
        key = name if name in figures else f"tuned_{name}"
        assert figures[key]["lo"] <= figures[key]["value"] <= figures[key]["hi"], name
    policy = json.loads((run / "evaluate" / "router_policy.json").read_text())
    assert policy["signal"] == "p10_logprob" and policy["schema"] is None


def test_served_summaries_route_on_p10_logprob(run, tmp_path):
    """The exported student behind the real router (openai SDK) on the evaluated p10_logprob policy:
    the tiny random student never ends its answer, so the hard gate escalates it to the real
    SmolLM2 teacher, which answers; a student-only policy answers from the student."""
    from support.router_helpers import client, running

    from pipeline.config import TeacherConfig
    from pipeline.llm.policy import Policy
    from pipeline.router.app import create_app
    from pipeline.router.backends import StudentBackend, TeacherBackend
    from pipeline.router.modes import Mode
    from pipeline.router.settings import ServeSettings
    from pipeline.task import load_task

    policy = Policy.load(run / "evaluate" / "router_policy.json")
    assert policy.signal == "p10_logprob" and policy.schema is None
    student = StudentBackend(run / "export" / "merged")
    teacher = TeacherBackend(
        TeacherConfig(spec=TEACHER, max_new_tokens=40),
        load_task(ROOT / "data" / "summary_task.yaml"),
        tmp_path / "cache.sqlite",
    )
    settings = ServeSettings(max_tokens=16, mode=Mode.parse("live"), deadline_s=300)
    message = [{"role": "user", "content": "Please cancel the desk lamp, order ORD-123456. Thanks, Ana Silva"}]
    with running(create_app(settings, {"distill-student": student}, replace(policy, threshold=-math.inf))) as url:
        raw = client(url).chat.completions.with_raw_response.create(
            model="distill-student", messages=message, max_tokens=16
        )
    assert raw.headers["x-distill-route"] == "student"
    with running(create_app(settings, {"distill-student": student}, policy, teacher=teacher)) as url:
        raw = client(url).chat.completions.with_raw_response.create(
            model="distill-student", messages=message, max_tokens=16
        )
        reply = raw.parse()
    assert raw.headers["x-distill-route"] == "teacher"
    assert reply.choices[0].message.content.strip()
    assert reply.distill["reason"] in (
        "answer ended by length, not by itself",
        "no threshold met the quality target: every request escalates",
    )
