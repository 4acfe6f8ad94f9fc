"""The budget as a hard ceiling under faults, what reasoning models are sent, and a dead
teacher that fails fast (issue 13, items 1 and 2).

    .venv/bin/pytest tests/teachers/test_capture_budget.py -q

The other end is the fault-injecting loopback server (tests/support/fault_server.py), which bills
every request it generated an answer for, as a real provider does, whether or not the
client read the answer.
"""

import socket
import time

import pytest
from support.capture_helpers import fast_retries, write_prompts, write_recipe
from support.fault_server import FaultServer

from pipeline.cli import main
from pipeline.config import TeacherConfig
from pipeline.teachers.service import TeacherService

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_budget_is_a_hard_ceiling_for_us_and_for_the_provider_under_20pct_faults():
    # A call costs ~$1.1e-5 and reserves ~$3.4e-5: the budget buys about 60 of 200 prompts.
    # Timeouts ("slow") and cut-off bodies ("truncated") were generated, so the server bills them.
    budget = 6.6e-4
    with FaultServer(fault_rate=0.2, slow_s=0.8, retry_after="0.01", seed=3) as server:
        cfg = TeacherConfig(
            **{**fast_retries(server.base_url, timeout_s=0.4, concurrency=4), "max_new_tokens": 4, "budget_usd": budget}
        )
        service = TeacherService.from_config(cfg, ":memory:")
        service.answer_sync([user(f"question number {i}") for i in range(200)])
        service.close()
        billed = server.billed_usd(**PRICE)
    report = service.report
    assert report.budget_stop and {"slow", "truncated"} <= set(server.faulted)
    assert report.spent_usd <= budget, "our own ledger went past the budget"
    assert billed <= budget, f"the provider billed ${billed:.6f}, over the ${budget} budget"
    assert billed <= report.spent_usd + 1e-12, "the ledger recorded less than the provider billed"


@pytest.mark.parametrize("model", ["o4-mini", "o3", "gpt-5-mini"])
def test_reasoning_models_get_max_completion_tokens_and_no_temperature(model):
    with FaultServer() as server:
        cfg = TeacherConfig(
            spec=f"openai:{model}", base_url=server.base_url, max_new_tokens=16, timeout_s=5, max_retries=0
        )
        service = TeacherService.from_config(cfg, ":memory:")
        [answer] = service.answer_sync([user("hello")])
        service.close()
    [body] = server.bodies
    assert answer.error is None, answer.error
    assert body["max_completion_tokens"] == 16
    assert not {"max_tokens", "temperature", "logprobs"} & set(body), body


def test_a_classic_model_still_gets_max_tokens_and_temperature():
    with FaultServer() as server:
        cfg = TeacherConfig(spec="openai:gpt-4o-mini", base_url=server.base_url, max_new_tokens=16, timeout_s=5)
        service = TeacherService.from_config(cfg, ":memory:")
        service.answer_sync([user("hello")])
        service.close()
    [body] = server.bodies
    assert (body["max_tokens"], body["temperature"], body["logprobs"]) == (16, 0.0, True)
    assert "max_completion_tokens" not in body


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: connecting is refused


def test_an_unreachable_teacher_fails_in_seconds_with_one_line_naming_the_url(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl", 200)
    port = closed_port()
    # Real-world backoff: without the breaker each of the 200 prompts would sit through 6
    # retries of up to 4 s each (minutes, 8 at a time); with it, the first call alone (the
    # preflight) trips it after 3 refused connections, about a second of backoff. The bound
    # is loose because it includes creating the MLflow store on a busy machine.
    teacher = {
        **fast_retries(f"http://user:hunter2@127.0.0.1:{port}/v1"),
        "backoff_initial_s": 0.5,
        "backoff_max_s": 4,
        "max_retries": 6,
    }
    recipe = write_recipe(tmp_path, teacher)
    start = time.monotonic()
    assert main(["capture", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--force"]) == 1
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "unreachable" in line and "on 3 attempts in a row" in line and "teacher.base_url" in line
    assert f"http://127.0.0.1:{port}/v1" in line
    assert "hunter2" not in err


# ---------------------------------------------------------------- structured output on classification tasks


def structured_capture(tmp_path, server) -> tuple[list[dict], list[str], list[str]]:
    import yaml
    from support.capture_helpers import TASK, read_records

    from pipeline.artifacts import read_manifest

    write_prompts(tmp_path / "prompts.jsonl", 6)
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path, fast_retries(server.base_url, max_new_tokens=16))
    assert main(["capture", str(recipe), "--runs-dir", str(runs), "--force"]) == 0
    labels = yaml.safe_load(TASK.read_text())["labels"]
    return read_records(runs), labels, read_manifest(runs / "cap" / "capture").notes


def test_a_classification_task_asks_for_a_label_enum_and_records_the_bare_label(tmp_path):
    with FaultServer(response_format="follow") as server:
        records, labels, notes = structured_capture(tmp_path, server)
    schemas = [body["response_format"]["json_schema"]["schema"] for body in server.bodies]
    assert len(schemas) == 6 and all(s["properties"]["label"]["enum"] == labels for s in schemas)
    assert all(r["messages"][-1]["content"] in labels and r["meta"]["error"] is None for r in records)
    assert not any("response_format" in note for note in notes)


def test_a_server_refusing_response_format_is_asked_once_then_not_again(tmp_path):
    with FaultServer(response_format="reject") as server:
        records, _, notes = structured_capture(tmp_path, server)
    # The first call (sent alone) tries json_schema, then json_object (each with, then without
    # logprobs), then no schema, which works; no later call asks for one.
    modes = [body.get("response_format", {}).get("type") for body in server.bodies]
    assert modes == ["json_schema", "json_schema", "json_object", "json_object"] + [None] * 6
    assert all(body.get("logprobs") for body in server.bodies[4:]), "logprobs were not the problem"
    assert all(r["meta"]["error"] is None for r in records)
    assert any("refused response_format" in note for note in notes)
