"""The router escalates to a real teacher over HTTP and logs every teacher answer (`make test`).

Student: the tiny random Llama (tests/conftest.py), served by real uvicorn on loopback and
driven by the real openai SDK. Teacher: the fault-injecting OpenAI-shaped loopback server
(tests/support/fault_server.py) behind the same TeacherService capture uses.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from support.fault_server import FaultServer, answer_for
from support.router_helpers import MODEL, TASK, FixedStudent, app_for, client, read_lines, running, teacher_for
from support.waiting import wait_for

from pipeline.config import PriceConfig
from pipeline.conversation import user_turn
from pipeline.llm.policy import Policy

PROMPT = "Classify: the parcel arrived broken."
ESCALATE = Policy(threshold=0.0)  # a random model's mean log-prob is < 0: every answer escalates


@pytest.fixture(scope="module")
def student(tiny_llama_dir):
    from pipeline.router.backends import StudentBackend

    return StudentBackend(tiny_llama_dir)


def ask(url: str, prompt: str = PROMPT, key: str = "unused", **kwargs):
    return client(url, key=key).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=6, **kwargs
    )


def shadow_pairs(url: str) -> float:
    """Shadowed student-teacher pairs the router has compared so far (its /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "distill_shadow_pairs_total"
    )


# ---------------------------------------------------------------- escalation


def test_escalation_returns_the_teachers_answer_and_logs_it(student, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_TEACHER_KEY", "sk-teacher-secret-123456")
    log_path = tmp_path / "escalations.jsonl"
    with (
        FaultServer() as server,
        running(
            app_for(student, ESCALATE, teacher_for(server, api_key_env="DISTILL_TEST_TEACHER_KEY"), log_path)
        ) as url,
    ):
        raw = ask(url, extra_headers={"x-request-id": "req-abc.1"})
    reply = raw.parse()
    assert reply.choices[0].message.content == answer_for(PROMPT)
    assert raw.headers["x-distill-route"] == "teacher" and raw.headers["x-request-id"] == "req-abc.1"
    confidence = float(raw.headers["x-distill-confidence"])
    assert confidence < 0 and len(raw.headers["x-distill-policy"]) == 12
    assert reply.distill["route"] == "teacher" and reply.distill["confidence"] == pytest.approx(confidence, abs=1e-4)
    assert reply.distill["policy"] == raw.headers["x-distill-policy"] and reply.distill["request_id"] == "req-abc.1"
    # The teacher was asked what capture asks it: instructions, worked examples, then the prompt.
    (body,) = server.bodies
    assert body["messages"] == TASK.teacher_messages(user_turn(PROMPT))
    (record,) = read_lines(log_path)
    assert record["id"] == "req-abc.1"
    assert record["messages"] == [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": answer_for(PROMPT)},
    ]
    meta = record["meta"]
    assert meta["source"] == "router" and meta["route"] == "teacher" and meta["teacher"] == "openai:fault-teacher"
    assert meta["policy"] == raw.headers["x-distill-policy"] and meta["confidence"] == pytest.approx(confidence)
    assert meta["reason"] == reply.distill["reason"] and isinstance(meta["student_answer"], str)
    assert {"cost_usd", "latency_ms"} <= set(meta)
    assert "sk-teacher-secret" not in log_path.read_text()


def test_a_logs_teacher_answers_the_conversations_it_holds_and_the_rest_fall_back(student, tmp_path):
    """teacher.spec=logs:<file> in serving (the wiring `distill serve` uses): an escalated conversation
    the file holds gets the file's answer, route teacher with source logs (a simulation, said in the
    body, a header and the escalation record), priced as eval.cost.teacher_priced_as; one it does not
    hold gets the student's answer (student-fallback), as when a teacher fails."""
    from pipeline.config import validate_recipe
    from pipeline.prices import priced_as
    from pipeline.router.wiring import build_teacher
    from pipeline.teachers.ledger import prompt_tokens_estimate

    held = tmp_path / "labelled.jsonl"
    held.write_text(
        json.dumps({"prompt": PROMPT, "label": "damaged"})
        + "\n"
        + json.dumps({"prompt": "where is it", "label": "late"})
    )
    recipe = validate_recipe(
        {
            "name": "sim",
            "teacher": {"spec": f"logs:{held}"},
            "eval": {"cost": {"teacher_priced_as": "openai:gpt-4o-mini"}},
        },
        "sim.yaml",
    )
    log_path = tmp_path / "escalations.jsonl"
    with running(app_for(student, ESCALATE, build_teacher(recipe, TASK, recipe.serve), log_path)) as url:
        known, unknown = ask(url), ask(url, prompt="Classify: something nobody labelled.")
    reply = known.parse()
    assert reply.choices[0].message.content == "damaged"
    assert known.headers["x-distill-route"] == "teacher" and known.headers["x-distill-source"] == "logs"
    assert reply.distill["route"] == "teacher" and reply.distill["source"] == "logs"
    fallback = unknown.parse()
    assert unknown.headers["x-distill-route"] == "student-fallback" and "x-distill-source" not in unknown.headers
    assert fallback.distill["source"] is None and "not in the logs" in fallback.distill["reason"]
    (record,) = read_lines(log_path)  # only the answer the file gave becomes a training record
    assert record["messages"] == [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "damaged"}]
    meta = record["meta"]
    assert meta["teacher"] == f"logs:{held}" and meta["teacher_source"] == "logs" and meta["route"] == "teacher"
    asked = TASK.teacher_messages(user_turn(PROMPT))
    price = priced_as("openai:gpt-4o-mini")
    assert meta["usage"] == {"prompt_tokens": prompt_tokens_estimate(asked), "completion_tokens": 1}
    assert meta["cost_usd"] == pytest.approx(price.cost(prompt_tokens_estimate(asked), 1)) and meta["cost_usd"] > 0


# An app's request as it is sent: per-request context in its system prompt, an earlier exchange.
CONVERSATION = [
    {"role": "developer", "content": "Customer profile: Premium since 2015; order A-12 in transit."},
    {"role": "user", "content": "hi, it's about my order"},
    {"role": "assistant", "content": "Sure, what happened?"},
    {"role": "user", "content": "the parcel arrived broken"},
]


class Seen:
    """The real student backend, noting the messages it is handed (what the student is fed)."""

    def __init__(self, backend):
        self.backend, self.messages = backend, []
        self.max_top_logprobs = backend.max_top_logprobs

    async def complete(self, messages, max_tokens, top_logprobs=None):
        self.messages.append(messages)
        return await self.backend.complete(messages, max_tokens, top_logprobs)


def converse(url: str, messages: list[dict]):
    return client(url).chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6)


def test_a_multi_turn_request_reaches_the_teacher_whole_and_is_logged_whole(student, tmp_path):
    """student_input=conversation: the student answers every turn; on escalation the teacher is asked
    every turn the app sent (developer read as system), the log holds them as sent, and logs:
    imports the log with zero rejects. Before, the teacher and the log got the last user message."""
    from pipeline.teachers.logs import import_logs

    log_path, seen = tmp_path / "escalations.jsonl", Seen(student)
    with (
        FaultServer() as server,
        running(
            app_for(seen, Policy(threshold=0.0, student_input="conversation"), teacher_for(server), log_path)
        ) as url,
    ):
        raw = converse(url, CONVERSATION)
    assert raw.headers["x-distill-route"] == "teacher"
    (body,) = server.bodies
    assert body["messages"] == [{"role": "system", "content": CONVERSATION[0]["content"]}, *CONVERSATION[1:]]
    assert seen.messages == [[{"role": "system", "content": CONVERSATION[0]["content"]}, *CONVERSATION[1:]]]
    (record,) = read_lines(log_path)
    answer = answer_for(CONVERSATION[-1]["content"])
    assert record["messages"] == [*CONVERSATION, {"role": "assistant", "content": answer}]
    assert record["meta"]["request"] == {"max_tokens": 6}
    imported = import_logs(log_path, prompt_col="prompt", label_col="label")
    assert imported.rejected == [] and [(r.messages, r.answer) for r in imported.records] == [(CONVERSATION, answer)]


def test_in_user_mode_the_task_instructions_come_first_and_the_student_reads_no_system_prompt(student, tmp_path):
    """student_input=user: the student reads the user and assistant turns; the teacher gets the task's
    instructions and worked examples before a conversation that has no system prompt (what capture
    sent it), and a conversation that has its own as it came. Both are logged as sent."""
    log_path, seen = tmp_path / "escalations.jsonl", Seen(student)
    history = CONVERSATION[1:]
    with FaultServer() as server, running(app_for(seen, ESCALATE, teacher_for(server), log_path)) as url:
        converse(url, history)
        converse(url, CONVERSATION)
    without, with_system = server.bodies
    assert without["messages"] == [
        {"role": "system", "content": TASK.instructions},
        {"role": "user", "content": TASK.examples[0].prompt},
        {"role": "assistant", "content": TASK.examples[0].label},
        *history,
    ]
    assert with_system["messages"] == [{"role": "system", "content": CONVERSATION[0]["content"]}, *history]
    assert seen.messages == [history, history]
    assert [r["messages"][:-1] for r in read_lines(log_path)] == [history, CONVERSATION]


def test_never_escalate_policy_never_asks_the_teacher(student, tmp_path):
    log_path = tmp_path / "escalations.jsonl"
    with (
        FaultServer() as server,
        running(app_for(student, Policy.student_only(), teacher_for(server), log_path)) as url,
    ):
        routes = {ask(url, p).headers["x-distill-route"] for p in ("hello", "refund please")}
    assert routes == {"student"} and server.total == 0 and not log_path.exists()


def test_null_policy_escalates_every_request(student, tmp_path):
    path = tmp_path / "router_policy.json"
    path.write_text(json.dumps({"threshold": None, "signal": "mean_logprob", "quality_target": 0.99}))
    with FaultServer() as server, running(app_for(student, Policy.load(path), teacher_for(server))) as url:
        raws = [ask(url, p) for p in ("where is my parcel", "refund please", "hello")]
    assert {r.headers["x-distill-route"] for r in raws} == {"teacher"}
    assert [r.parse().choices[0].message.content for r in raws] == [
        answer_for(p) for p in ("where is my parcel", "refund please", "hello")
    ]


@pytest.mark.parametrize("fault", ["500", "slow", "truncated", "429"])
def test_failing_teacher_gives_student_fallback_within_the_deadline(student, fault):
    from pipeline.llm.generate import generate_batch

    # 429 with a Retry-After far past the deadline, slow far past it too: a router that waited for
    # the teacher would get its answer (the retry, the slow reply) and route it as "teacher"; one
    # that keeps its 2.5 s deadline answers with the student first.
    # 500 on every call: a first-call 500 alone reads as "response_format refused" to the
    # teacher client (pipeline/teachers/openai_compat.py), which then retries without it.
    faults = {"status": 500} if fault == "500" else {"plan": {1: fault}}
    server = FaultServer(slow_s=8.0, retry_after="8", **faults).start()
    teacher = teacher_for(server, max_retries=1 if fault == "429" else 0, timeout_s=10)
    with running(app_for(student, ESCALATE, teacher, deadline_s=2.5)) as url:
        raw = ask(url)
    (direct,) = generate_batch(student.model, student.tokenizer, [[{"role": "user", "content": PROMPT}]], 6)
    assert raw.headers["x-distill-route"] == "student-fallback"
    assert raw.parse().choices[0].message.content == direct.text
    assert "teacher failed" in raw.parse().distill["reason"]
    server.stop()


def test_teacher_process_killed_mid_test_degrades_without_5xx(student):
    """A real teacher process, killed between two requests: the second gets the student."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parents[1] / "support" / "fault_server.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--fault-rate", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert "serving on" in proc.stdout.readline()

        class Where:  # what teacher_for reads off a FaultServer
            base_url = f"http://127.0.0.1:{port}/v1"

        with running(app_for(student, ESCALATE, teacher_for(Where), deadline_s=2.0)) as url:
            assert ask(url, "first").headers["x-distill-route"] == "teacher"
            proc.kill()
            proc.wait(5)
            raws = [ask(url, p) for p in ("second", "third")]
    finally:
        proc.kill()
        proc.wait(5)
    assert {r.headers["x-distill-route"] for r in raws} == {"student-fallback"}
    assert all(r.http_response.status_code == 200 for r in raws)


# ---------------------------------------------------------------- the loop


def test_escalations_import_through_logs_with_zero_rejects(student, tmp_path):
    from pipeline.teachers.logs import import_logs

    log_path = tmp_path / "escalations.jsonl"
    prompts = ["where is my parcel", "refund please", "the lid is cracked", 'quote " and \\ backslash']
    with FaultServer() as server, running(app_for(student, ESCALATE, teacher_for(server), log_path)) as url:
        for p in prompts:
            ask(url, p)
    imported = import_logs(log_path, prompt_col="prompt", label_col="label")
    assert imported.rejected == []
    assert [(r.messages, r.answer) for r in imported.records] == [(user_turn(p), answer_for(p)) for p in prompts]


def test_shadow_mode_answers_from_the_teacher_and_logs_both(student, tmp_path):
    log_path = tmp_path / "escalations.jsonl"
    with FaultServer() as server:
        app = app_for(student, ESCALATE, teacher_for(server), log_path, mode="shadow")
        with running(app) as url:
            raw = ask(url)
            wait_for(
                lambda: read_lines(log_path), "the shadowed student's answer in the log (it lands after the reply)"
            )
    assert raw.headers["x-distill-route"] == "teacher" and raw.parse().choices[0].message.content == answer_for(PROMPT)
    (record,) = read_lines(log_path)
    assert record["meta"]["student_answer"] is not None and record["meta"]["agree"] is False
    assert record["meta"]["reason"].startswith("shadow; policy would escalate")


def test_off_mode_is_teacher_only(student):
    with (
        FaultServer() as server,
        running(app_for(student, Policy.student_only(), teacher_for(server), mode="off")) as url,
    ):
        raw = ask(url)
    assert raw.headers["x-distill-route"] == "teacher" and raw.headers["x-distill-confidence"] == "none"


def test_canary_split_is_deterministic_and_near_its_share():
    from pipeline.router.modes import Mode

    canary = Mode.parse("canary:10")
    routed = [canary.routed(f"user-{i}") for i in range(1000)]
    assert 75 <= sum(routed) <= 125
    assert routed == [canary.routed(f"user-{i}") for i in range(1000)]  # same user, same side, every time
    assert Mode.parse("live").routed("x") and not Mode.parse("off").routed("x")


def test_canary_routes_by_user_over_http(student):
    from pipeline.router.modes import Mode

    canary = Mode.parse("canary:50")
    users = [f"u{i}" for i in range(8)]
    with (
        FaultServer() as server,
        running(app_for(student, Policy.student_only(), teacher_for(server), mode="canary:50")) as url,
    ):
        routes = [ask(url, "hello", user=u).headers["x-distill-route"] for u in users]
    assert routes == ["student" if canary.routed(u) else "teacher" for u in users]


# ---------------------------------------------------------------- streaming, metrics, readiness


@pytest.mark.parametrize("policy", [Policy.student_only(), ESCALATE], ids=["student", "teacher"])
def test_streamed_answer_equals_the_non_streamed_one(student, policy):
    with FaultServer() as server, running(app_for(student, policy, teacher_for(server))) as url:
        whole = ask(url)
        raw = ask(url, stream=True, stream_options={"include_usage": True})
        chunks = list(raw.parse())
    assert raw.headers["x-distill-route"] == whole.headers["x-distill-route"]  # decided before the first byte
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.parse().choices[0].message.content
    assert all(c.distill["route"] == whole.headers["x-distill-route"] for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.parse().choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.parse().usage.total_tokens


def test_stop_sequences_are_honoured(student):
    with FaultServer() as server, running(app_for(student, ESCALATE, teacher_for(server))) as url:
        reply = ask(url, stop=["-"]).parse()
    assert reply.choices[0].message.content == answer_for(PROMPT).split("-")[0]  # "ans"
    assert reply.choices[0].finish_reason == "stop"


def test_metrics_are_scraped_and_ready_says_what_serves(student):
    from prometheus_client.parser import text_string_to_metric_families

    with FaultServer() as server, running(app_for(student, ESCALATE, teacher_for(server))) as url:
        ask(url, "one")
        ask(url, "two")
        text = httpx.get(f"{url}/metrics").text
        ready = httpx.get(f"{url}/ready").json()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("distill_requests_total", (("mode", "live"), ("route", "teacher")))] == 2
    assert samples[("distill_escalation_rate", ())] == 1.0
    assert samples[("distill_confidence_mean_logprob_count", ())] == 2
    assert samples[("distill_latency_seconds_count", (("phase", "teacher"),))] == 2
    assert samples[("distill_tokens_total", (("kind", "completion"), ("system", "teacher")))] == 6
    assert ready == {
        "status": "ready",
        "mode": "live",
        "policy": ready["policy"],
        "threshold": 0.0,
        "teacher": "openai:fault-teacher",
        "rolled_back": False,
    }


# ---------------------------------------------------------------- admission and budget


def test_full_queue_answers_429_with_retry_after_and_health_stays_fast(student):
    server = FaultServer(latency_s=8.0)  # the admitted two wait on the teacher, using no CPU
    with (
        server,
        running(app_for(student, ESCALATE, teacher_for(server, timeout_s=60), max_queue=2, deadline_s=120)) as url,
    ):

        def one(i: int):
            try:
                return ask(url, f"prompt {i}").headers["x-distill-route"]
            except openai.RateLimitError as err:
                assert err.response.headers["retry-after"] == "1" and err.code == "queue_full"
                return 429

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(8)]
            wait_for(
                lambda: server.total == 2 and sum(f.done() for f in futures) == 6,
                "two requests at the teacher and six refused",
            )
            assert httpx.get(f"{url}/health").status_code == 200
            assert sum(not f.done() for f in futures) == 2  # health answered while both still wait
            results = [f.result() for f in futures]
    assert results.count(429) == 6 and results.count("teacher") == 2


def test_concurrent_escalations_never_exceed_the_budget(student):
    from pipeline.router.backends import TeacherBackend

    price = PriceConfig(input_per_mtok=1000.0, output_per_mtok=1000.0)  # ~ $0.01-0.05 a call
    with FaultServer(latency_s=0.2) as server:
        teacher = teacher_for(server, price=price, allow_unpriced=False)
        teacher = TeacherBackend(teacher.cfg, TASK, ":memory:", budget_usd=0.2)
        with running(app_for(student, ESCALATE, teacher, max_queue=32)) as url:
            with ThreadPoolExecutor(16) as pool:
                routes = list(
                    pool.map(lambda i: ask(url, f"distinct prompt {i}").headers["x-distill-route"], range(16))
                )
        spent = teacher.spent_usd
    assert spent <= 0.2 and math.isfinite(spent)
    assert 0 < routes.count("teacher") < 16 and routes.count("teacher") + routes.count("student-fallback") == 16


# ---------------------------------------------------------------- startup checks


def test_saved_dollars_are_estimated_for_student_answers():
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.router.backends import TeacherBackend

    price = PriceConfig(input_per_mtok=1000.0, output_per_mtok=1000.0)
    with FaultServer() as server:
        teacher = TeacherBackend(teacher_for(server, price=price, allow_unpriced=False).cfg, TASK, ":memory:")
        with running(app_for(FixedStudent(), Policy(threshold=-5.0), teacher)) as url:
            assert ask(url).headers["x-distill-route"] == "student"
            text = httpx.get(f"{url}/metrics").text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    expected = teacher.estimated_cost(user_turn(PROMPT), 1)
    assert expected > 0 and values["distill_saved_usd_estimate_total"] == pytest.approx(expected)
    assert server.total == 0  # estimated, not asked


def test_policy_for_another_adapter_refuses_to_start(tmp_path):
    from pipeline.artifacts import Manifest, write_manifest
    from pipeline.errors import DistillError
    from pipeline.router.wiring import check_policy_matches_export

    export = tmp_path / "export"
    export.mkdir()
    write_manifest(export, Manifest(stage="export", inputs={"finetune": "a" * 64}))
    policy = tmp_path / "router_policy.json"
    policy.write_text(json.dumps({"threshold": -1.0, "adapter_sha256": "b" * 64}))
    with pytest.raises(DistillError, match="evaluated on adapter bbbbbbbbbbbb but .* adapter aaaaaaaaaaaa"):
        check_policy_matches_export(policy, export)
    policy.write_text(json.dumps({"threshold": -1.0, "adapter_sha256": "a" * 64}))
    check_policy_matches_export(policy, export)  # matching: fine
    policy.write_text(json.dumps({"threshold": -1.0}))
    with pytest.raises(DistillError, match="no adapter_sha256, so not a policy `distill evaluate` wrote"):
        check_policy_matches_export(policy, export)


def test_distill_serve_refuses_a_mismatched_policy_before_loading(tmp_path, capsys):
    from pipeline.artifacts import Manifest, write_manifest
    from pipeline.cli import main
    from pipeline.config import load_recipe

    name = load_recipe("smollm2-135m-cpu").name
    run = tmp_path / name
    for stage, outputs, inputs in (
        ("export", {"merged/config.json": "x"}, {"finetune": "a" * 64}),
        ("evaluate", {"router_policy.json": "y"}, {}),
    ):
        (run / stage).mkdir(parents=True)
        write_manifest(run / stage, Manifest(stage=stage, outputs=outputs, inputs=inputs))
    (run / "evaluate" / "router_policy.json").write_text(json.dumps({"threshold": -1.0, "adapter_sha256": "b" * 64}))
    assert main(["serve", "smollm2-135m-cpu", "--runs-dir", str(tmp_path)]) == 1
    assert "rerun `distill evaluate`" in capsys.readouterr().err


# ---------------------------------------------------------------- rollback, reload, label scores


def test_shadow_disagreement_rolls_back_to_off(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    keep_all = Policy(threshold=-5.0, quality_target=0.9)  # the policy would keep every answer
    with (
        FaultServer() as server,
        running(
            app_for(
                FixedStudent(), keep_all, teacher_for(server), tmp_path / "e.jsonl", mode="shadow", rollback_window=3
            )
        ) as url,
    ):
        modes = []
        for i in range(6):
            modes.append(ask(url, f"p{i}").parse().distill["mode"])
            wait_for(lambda i=i: shadow_pairs(url) == min(i + 1, 3), "the background comparison to land")
        ready = httpx.get(f"{url}/ready").json()
        text = httpx.get(f"{url}/metrics").text
    # The student ("damaged") never agrees with the fault teacher ("ans-..."): 3 pairs trip it.
    assert modes[:3] == ["shadow"] * 3 and modes[-1] == "off"
    assert ready["mode"] == "off" and ready["rolled_back"] is True
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["distill_rolled_back"] == 1 and values["distill_rolling_agreement"] == 0.0


def test_rollback_needs_a_full_window_below_target():
    from pipeline.router.modes import Rollback

    rollback = Rollback(target=0.5, window=4)
    assert [rollback.observe(a) for a in (False, False, True)] == [False, False, False]  # window not full
    assert rollback.observe(False) is True and rollback.tripped
    assert rollback.observe(False) is False  # trips once
    assert Rollback(target=None, window=1).observe(False) is False  # no target: never


def test_policy_reload_under_load_fails_no_request(tmp_path):
    from pipeline.errors import DistillError

    path = tmp_path / "router_policy.json"
    path.write_text(json.dumps({"threshold": -5.0}))

    def reload() -> Policy:
        return Policy.load(path)

    from pydantic import SecretStr

    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    admin = {"Authorization": "Bearer sk-admin-test"}
    with FaultServer() as server:
        app = create_app(
            ServeSettings(max_tokens=8, api_keys=(SecretStr("sk-admin-test"),)),
            {MODEL: FixedStudent()},
            reload(),
            teacher=teacher_for(server),
            reload_policy=reload,
        )
        with running(app) as url:
            with ThreadPoolExecutor(4) as pool:
                futures = [
                    pool.submit(lambda i: ask(url, f"q{i % 3}", key="sk-admin-test").headers["x-distill-route"], i)
                    for i in range(24)
                ]
                hashes = []
                for threshold in (0.0, -5.0, None):
                    path.write_text(json.dumps({"threshold": threshold}))
                    hashes.append(httpx.post(f"{url}/admin/reload-policy", headers=admin).json()["policy"])
                routes = [f.result() for f in futures]
            path.write_text("{not json")
            refused = httpx.post(f"{url}/admin/reload-policy", headers=admin)
            after = ask(url, key="sk-admin-test").headers["x-distill-policy"]
    assert set(routes) <= {"student", "teacher"} and len(routes) == 24  # every request answered, none failed
    assert len(set(hashes)) == 3
    assert refused.status_code == 400 and "kept the current one" in refused.json()["error"]["message"]
    assert str(tmp_path) not in refused.text  # the reason names a file on the server: it stays in the log
    assert after == hashes[-1]  # the refused reload left the last good policy in place
    with pytest.raises(DistillError):
        reload()


def test_student_backend_scores_labels_for_label_signals(tiny_llama_dir):
    import asyncio

    from pipeline.router.backends import StudentBackend

    backend = StudentBackend(tiny_llama_dir, score_labels=["damaged", "late"])
    answer = asyncio.run(backend.complete([{"role": "user", "content": PROMPT}], 4))
    assert set(answer.label_logprobs) == {"damaged", "late"}
    assert all(v < 0 for v in answer.label_logprobs.values())


def test_student_backend_decoding_by_label_posterior_answers_a_label(tiny_llama_dir):
    import asyncio

    from pipeline.router.backends import StudentBackend

    backend = StudentBackend(tiny_llama_dir, score_labels=["damaged", "late"], decode="label_posterior")
    answer = asyncio.run(backend.complete([{"role": "user", "content": PROMPT}], 8))
    assert answer.text == max(answer.label_logprobs, key=answer.label_logprobs.get) and answer.stopped


def test_concurrent_requests_share_a_generate_call_with_batch_of_one_answers(tiny_llama_dir):
    from pipeline.llm.generate import generate_batch
    from pipeline.router.backends import StudentBackend

    # The window only closes a batch early; with all four requests sent at once it fills to four.
    backend = StudentBackend(tiny_llama_dir, max_batch=4, window_s=600)
    prompts = ["where is my parcel", "refund please", "the lid is cracked, send a new one", "hi"]
    with running(app_for(backend, Policy.student_only())) as url, ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda p: ask(url, p).parse().choices[0].message.content, prompts))
    assert backend.batches == [4]
    alone = [
        generate_batch(backend.model, backend.tokenizer, [[{"role": "user", "content": p}]], 6)[0].text for p in prompts
    ]
    assert replies == alone
