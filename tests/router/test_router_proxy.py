"""Capture by proxy (`distill serve RECIPE --teacher-only`, pipeline/router/proxy.py), through the
real openai SDK pointed at it as an app would point OPENAI_BASE_URL (`make test`): each request
reaches the teacher as sent, the answer comes back unchanged (streamed too), and every pair lands
in a capture log that `logs:` imports with zero rejects. Teacher: the fault server, which records
the bodies it receives.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from support.fault_server import FaultServer, answer_for
from support.router_helpers import running

from pipeline.artifacts import read_jsonl
from pipeline.config import PriceConfig, TeacherConfig
from pipeline.errors import DistillError

CONVERSATION = [
    {"role": "system", "content": "You are Acme's support bot. Customer profile: Premium since 2015."},
    {"role": "developer", "content": "Answer in one short sentence."},
    {"role": "user", "content": "My parcel never came."},
    {"role": "assistant", "content": "Sorry to hear that! What is the order number?"},
    {"role": "user", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "A1234567."}]},
]
AS_SENT = [*CONVERSATION[:4], {"role": "user", "content": "It is A1234567."}]
PARAMS = {
    "max_tokens": 20,
    "temperature": 0.3,
    "top_p": 0.9,
    "seed": 7,
    "stop": ["\n\n"],
    "response_format": {"type": "json_object"},
}
MODEL = "fault-teacher"


def proxy_for(server: FaultServer, tmp_path, **overrides):
    from pipeline.router.proxy import ProxyTeacher, create_proxy_app
    from pipeline.router.record_log import RecordLog
    from pipeline.router.settings import ServeSettings

    fields = dict(
        spec=f"openai:{MODEL}",
        base_url=server.base_url,
        allow_unpriced=True,
        max_retries=0,
        timeout_s=10,
        backoff_initial_s=0.01,
        logprobs=False,
    )
    cfg = TeacherConfig(**{**fields, **overrides})
    teacher = ProxyTeacher(cfg, tmp_path / "cache.sqlite", ledger_path=tmp_path / "ledger.json")
    log = RecordLog(tmp_path / "proxy.jsonl")
    return create_proxy_app(ServeSettings(max_tokens=64), teacher, log, model_names=("distill-student",)), log


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_each_request_reaches_the_teacher_as_sent_and_lands_in_the_capture_log(tmp_path):
    from pipeline.teachers.logs import import_logs

    with FaultServer() as server:
        app, log = proxy_for(server, tmp_path)
        with running(app) as url:
            reply = sdk(url).chat.completions.create(model=MODEL, messages=CONVERSATION, **PARAMS)
            streamed = "".join(
                c.choices[0].delta.content or ""
                for c in sdk(url).chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "stream this"}], stream=True
                )
                if c.choices
            )
    assert reply.choices[0].message.content == answer_for("It is A1234567.")
    assert streamed == answer_for("stream this")
    first, second = server.bodies
    assert first["messages"] == AS_SENT  # every turn, developer role kept, text parts joined
    assert {k: first[k] for k in PARAMS} == PARAMS and first["model"] == MODEL
    assert second["max_tokens"] == 64 and "temperature" not in second  # unbounded -> serve.max_tokens; no default added

    records = read_jsonl(log.path)
    assert [r["messages"] for r in records] == [
        [*AS_SENT, {"role": "assistant", "content": answer_for("It is A1234567.")}],
        [{"role": "user", "content": "stream this"}, {"role": "assistant", "content": answer_for("stream this")}],
    ]
    meta = records[0]["meta"]
    assert meta["source"] == "proxy" and meta["teacher"] == f"openai:{MODEL}" and meta["request"] == PARAMS
    assert records[1]["meta"]["request"] == {"max_tokens": 64}
    imported = import_logs(log.path, "prompt", "label")  # the whole conversation comes back, zero rejects
    assert not imported.rejected and [r.messages for r in imported.records] == [
        AS_SENT,
        [{"role": "user", "content": "stream this"}],
    ]


def test_a_repeated_request_is_answered_from_the_cache_and_the_budget_is_kept(tmp_path):
    price = PriceConfig(input_per_mtok=1000.0, output_per_mtok=1000.0)
    with FaultServer() as server:
        app, log = proxy_for(server, tmp_path, price=price, allow_unpriced=False, budget_usd=0.3)
        with running(app) as url:
            ask = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "once"}]}
            replies = [httpx.post(f"{url}/v1/chat/completions", json=ask) for _ in range(2)]
            over = httpx.post(
                f"{url}/v1/chat/completions", json={**ask, "messages": [{"role": "user", "content": "x" * 400}]}
            )
    assert [r.status_code for r in replies] == [200, 200] and server.requests["once"] == 1
    assert over.status_code == 429 and over.json()["error"]["code"] == "budget_exhausted"
    assert server.total == 1 and len(read_jsonl(log.path)) == 2


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_what_a_record_cannot_hold_is_refused_not_dropped(tmp_path, extra, param):
    with FaultServer() as server:
        app, log = proxy_for(server, tmp_path)
        with running(app) as url:
            reply = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra},
            )
            unknown = httpx.post(
                f"{url}/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    assert unknown.status_code == 404 and server.total == 0 and not log.path.exists()


def test_the_proxy_takes_only_a_network_teacher_and_no_student_options(tmp_path, monkeypatch):
    from pipeline.cli import main
    from pipeline.config import Recipe
    from pipeline.router.wiring import proxy_app

    with pytest.raises(DistillError, match="network teacher"):
        proxy_app(Recipe(name="t", teacher=TeacherConfig(spec="local:embedded:smollm2-135m-instruct")))
    assert main(["serve", "smollm2-135m-cpu", "--teacher-only", "--model", "models:/x@champion"]) == 1


def test_personal_data_never_reaches_the_proxy_log(tmp_path):
    with FaultServer() as server:
        app, log = proxy_for(server, tmp_path)
        with running(app) as url:
            sdk(url).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "refund card 4111 1111 1111 1111 to jo@example.com"}]
            )
    assert server.bodies[0]["messages"][0]["content"].endswith("jo@example.com")  # the teacher got it as sent
    text = log.path.read_text()
    assert "4111" not in text and "jo@example.com" not in text and json.loads(text)["meta"]["source"] == "proxy"


def test_a_conversation_logs_could_not_learn_from_is_answered_but_not_recorded(tmp_path):
    """An assistant prefill as the last turn is forwarded and answered, but a record of it would not
    end in a user turn, so `logs:` would reject it: it is counted, not written."""
    from pipeline.teachers.logs import import_logs

    prefilled = [{"role": "user", "content": "My parcel never came."}, {"role": "assistant", "content": "Sorry"}]
    with FaultServer() as server:
        app, log = proxy_for(server, tmp_path)
        with running(app) as url:
            answered = sdk(url).chat.completions.create(model=MODEL, messages=prefilled, max_tokens=8)
            kept = sdk(url).chat.completions.create(model=MODEL, messages=prefilled[:1], max_tokens=8)
            metrics = httpx.get(f"{url}/metrics").text
    assert answered.choices[0].message.content and server.bodies[0]["messages"] == prefilled
    assert [r["messages"][:-1] for r in read_jsonl(log.path)] == [prefilled[:1]]
    assert kept.choices[0].message.content == answer_for("My parcel never came.")
    assert 'distill_errors_total{kind="not_recorded"} 1.0' in metrics
    assert not import_logs(log.path, "prompt", "label").rejected
