"""The router's API surface through the real openai SDK over loopback HTTP (`make test`):
several API keys, logprobs / top_logprobs, and cancelling work when the client goes away.

Student: the tiny random Llama (tests/conftest.py). Teacher, where one is needed: the
fault-injecting OpenAI-shaped loopback server (tests/support/fault_server.py).
"""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
from support.router_helpers import MESSAGES, MODEL, client, running

from pipeline.config import ServeConfig
from pipeline.errors import DistillError
from pipeline.llm.policy import Policy

KEYS = ("sk-env-one-1111", "sk-env-two-2222", "sk-file-three-3333", "sk-file-four-4444")


@pytest.fixture(scope="module")
def student(tiny_llama_dir):
    from pipeline.router.backends import StudentBackend

    return StudentBackend(tiny_llama_dir)


# ---------------------------------------------------------------- API keys


def test_every_configured_key_works_and_a_wrong_one_is_401(student, tmp_path, monkeypatch, caplog):
    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    monkeypatch.setenv("DISTILL_TEST_KEYS", f" {KEYS[0]} ,{KEYS[1]},")
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# rotated 2024-06\n{KEYS[2]}\n\n  {KEYS[3]}  \n")
    cfg = ServeConfig(api_key_env="DISTILL_TEST_KEYS", api_keys_file=keys_file, max_tokens=4)
    caplog.set_level(logging.DEBUG)
    settings = ServeSettings.from_config(cfg)
    assert len(settings.api_keys) == 4
    with running(create_app(settings, {MODEL: student}, Policy.student_only())) as url:
        for key in KEYS:
            reply = client(url, key=key).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            assert reply.choices[0].message.role == "assistant"
        for wrong in ("sk-wrong", KEYS[0][:-1], KEYS[0] + "x", f"{KEYS[0]},{KEYS[1]}", "# rotated 2024-06"):
            with pytest.raises(openai.AuthenticationError) as err:
                client(url, key=wrong).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
            assert not any(k in err.value.message for k in KEYS)
        missing = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
        assert missing.status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # liveness stays open for probes
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(k in logged for k in KEYS), "an API key reached the log"
    assert not any(k in repr(settings) for k in KEYS)


def test_bad_key_sources_are_refused_with_the_source_named(tmp_path, monkeypatch):
    from pipeline.router.settings import read_api_keys

    with pytest.raises(DistillError, match="nokeys.txt: cannot read it"):
        read_api_keys(None, tmp_path / "nokeys.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(DistillError, match="empty.txt holds no key"):
        read_api_keys(None, empty)
    monkeypatch.setenv("DISTILL_TEST_KEYS", "sk-a,sk-b,sk-a")
    assert [k.get_secret_value() for k in read_api_keys("DISTILL_TEST_KEYS")] == ["sk-a", "sk-b"]
    assert read_api_keys(None, None) == ()  # nothing named: no auth


# ---------------------------------------------------------------- logprobs


@pytest.fixture(scope="module")
def real_student(embedded_dir):
    """The embedded SmolLM2: a real model, so its answer has words to cut and alternatives to rank."""
    from pipeline.router.backends import StudentBackend

    return StudentBackend(embedded_dir)


@pytest.fixture(scope="module")
def real_url(real_student):
    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    with running(create_app(ServeSettings(max_tokens=8), {MODEL: real_student}, Policy.student_only())) as url:
        yield url


def test_logprobs_are_the_students_own_tokens_with_ranked_alternatives(real_url, real_student):
    from pipeline.llm.generate import generate_batch

    raw = client(real_url).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3
    )
    reply = raw.parse()
    (choice,) = reply.choices
    tokens = choice.logprobs.content
    (direct,) = generate_batch(real_student.model, real_student.tokenizer, [MESSAGES], 8)
    assert choice.message.content == direct.text and direct.text  # a real answer, not an empty one
    assert len(tokens) == reply.usage.completion_tokens == len(direct.token_ids)
    assert "".join(t.token for t in tokens).strip() == choice.message.content
    assert bytes(b for t in tokens for b in t.bytes).decode() == "".join(t.token for t in tokens)
    for token, want in zip(tokens, direct.token_logprobs):
        assert token.logprob == pytest.approx(want, abs=1e-5)  # generate's number: what the policy read
        assert len(token.top_logprobs) == 3
        ranked = [a.logprob for a in token.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and all(v <= 0 for v in ranked)
        # Greedy decoding picks the likeliest token: it heads its own alternatives.
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-3)
    # The confidence header is the mean of these very numbers (the student-only policy reads mean_logprob).
    mean = sum(t.logprob for t in tokens) / len(tokens)
    assert float(raw.headers["x-distill-confidence"]) == pytest.approx(mean, abs=1e-3)


def test_logprobs_without_alternatives_and_cut_at_a_stop_sequence(real_url):
    plain = client(real_url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True)
    tokens = plain.choices[0].logprobs.content
    assert tokens and all(t.top_logprobs == [] for t in tokens)
    assert (
        client(real_url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8).choices[0].logprobs
        is None
    )  # not asked: not sent
    stop = tokens[-2].token  # a word inside the answer: what follows it is cut, tokens included
    cut = client(real_url).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, stop=[stop]
    )
    text = cut.choices[0].message.content
    assert text == plain.choices[0].message.content.split(stop)[0]
    kept = cut.choices[0].logprobs.content
    assert "".join(t.token for t in kept).strip() == text.strip()
    assert [t.token for t in kept] == [t.token for t in tokens[: len(kept)]] and len(kept) < len(tokens)


def test_streamed_logprobs_equal_the_non_streamed_ones(real_url):
    once = client(real_url).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2
    )
    text, streamed = "", []
    for chunk in client(real_url).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2, stream=True
    ):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            streamed += choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
        assert chunk.distill["route"] == "student"
    assert text == once.choices[0].message.content
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in once.choices[0].logprobs.content]


class _NoTokenLogprobs:
    """A student whose backend reports no per-token detail (as a text-only upstream would)."""

    max_top_logprobs = None

    async def complete(self, messages, max_tokens, top_logprobs=None):
        from pipeline.llm.completion import Completion

        return Completion(text="late", token_logprobs=[-0.1])


def test_logprobs_the_backend_cannot_give_are_refused_not_ignored(student):
    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    app = create_app(
        ServeSettings(max_tokens=8), {MODEL: student, "text-only": _NoTokenLogprobs()}, Policy.student_only()
    )
    with running(app) as url:
        cases = [
            ({"model": MODEL, "top_logprobs": 2}, "top_logprobs", "needs logprobs=true"),
            ({"model": MODEL, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
            ({"model": "text-only", "logprobs": True}, "logprobs", "returns no token logprobs"),
        ]
        for kwargs, param, says in cases:
            with pytest.raises(openai.BadRequestError) as err:
                client(url).chat.completions.create(messages=MESSAGES, max_tokens=2, **kwargs)
            assert err.value.param == param and says in err.value.message
        # Without logprobs the text-only student answers as ever.
        assert (
            client(url).chat.completions.create(model="text-only", messages=MESSAGES).choices[0].message.content
            == "late"
        )


def test_a_teachers_answer_carries_no_student_logprobs(student):
    from support.fault_server import FaultServer, answer_for
    from support.router_helpers import app_for, teacher_for

    with FaultServer() as server, running(app_for(student, Policy(threshold=0.0), teacher_for(server))) as url:
        raw = client(url).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=1
        )
    reply = raw.parse()
    assert reply.distill["route"] == "teacher" and reply.choices[0].message.content == answer_for(
        MESSAGES[0]["content"]
    )
    assert reply.choices[0].logprobs is None  # the student's tokens would describe another answer


# ---------------------------------------------------------------- the client goes away


def _scrape(url: str, name: str, **labels: str) -> float:
    """A metric's value from /metrics, summed over samples with these labels (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _freed(url: str) -> bool:
    """The router counted the hang-up and holds no request any more."""
    return (
        _scrape(url, "distill_errors_total", kind="client_disconnected") == 1 and _scrape(url, "distill_in_flight") == 0
    )


def _wait_for(condition, what: str, limit_s: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def _hang_up(url: str, prompt: str) -> None:
    """A client that gives up after 1 s: the SDK times out and closes its connection."""
    quick = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        quick.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4)


class _GatedStudent:
    """The real student behind a gate the test opens: a student still busy when its client leaves."""

    max_top_logprobs = None

    def __init__(self, student):
        import threading

        self.student, self.gate, self.asked = student, threading.Event(), []

    async def complete(self, messages, max_tokens):
        import asyncio

        self.asked.append(messages[-1]["content"])
        await asyncio.to_thread(self.gate.wait)
        return await self.student.complete(messages, max_tokens)


def test_a_client_gone_while_the_student_works_never_reaches_the_teacher(student):
    from support.fault_server import FaultServer, answer_for
    from support.router_helpers import app_for, teacher_for

    gated = _GatedStudent(student)
    with (
        FaultServer() as server,
        running(app_for(gated, Policy(threshold=0.0), teacher_for(server), max_queue=1)) as url,
    ):
        try:
            _hang_up(url, "left early")
            _wait_for(lambda: _freed(url), "the router noticed the hang-up and freed the slot")
        finally:
            gated.gate.set()
        # The one slot is free again: the next request is admitted (not 429) and escalates.
        reply = client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "stayed"}], max_tokens=4
        )
        assert reply.distill["route"] == "teacher" and reply.choices[0].message.content == answer_for("stayed")
        assert gated.asked == ["left early", "stayed"]
    # Every policy here escalates, so a request that kept running would have asked the teacher.
    assert server.requests["left early"] == 0 and server.requests["stayed"] == 1


def test_a_client_gone_while_the_teacher_is_slow_frees_its_queue_slot(student, tmp_path):
    from support.fault_server import FaultServer, answer_for
    from support.router_helpers import app_for, read_lines, teacher_for

    # The first teacher call takes 60 s (longer than this test waits), the next ones answer at once.
    with (
        FaultServer(plan={1: "slow"}, slow_s=60) as server,
        running(
            app_for(
                student,
                Policy(threshold=0.0),
                teacher_for(server, timeout_s=120),
                tmp_path / "esc.jsonl",
                mode="off",
                max_queue=1,
                deadline_s=120,
            )
        ) as url,
    ):
        _hang_up(url, "slow one")
        # Freed while the teacher is still working on it: only cancelling frees it this early.
        _wait_for(lambda: _freed(url), "the slot came back before the teacher answered")
        assert server.requests["slow one"] == 1 and not server.successes["slow one"]
        reply = client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "next"}], max_tokens=4
        )
        assert reply.distill["route"] == "teacher" and reply.choices[0].message.content == answer_for("next")
    # Only the answered request reached the training log.
    assert [r["messages"][-1]["content"] for r in read_lines(tmp_path / "esc.jsonl")] == [answer_for("next")]


def test_in_shadow_mode_the_client_never_waits_for_the_student(student, tmp_path):
    # Shadow adds no latency by construction, shown without timing anything: the student is held
    # behind a gate the test opens only after the client already has the teacher's answer; the
    # shadow record lands once the student is let go.
    from support.fault_server import FaultServer, answer_for
    from support.router_helpers import app_for, read_lines, teacher_for

    gated, log_path = _GatedStudent(student), tmp_path / "esc.jsonl"
    with (
        FaultServer() as server,
        running(app_for(gated, Policy(threshold=0.0), teacher_for(server), log_path, mode="shadow")) as url,
    ):
        try:
            reply = client(url).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "shadowed"}], max_tokens=4, timeout=30
            )
            assert reply.distill["route"] == "teacher" and reply.choices[0].message.content == answer_for("shadowed")
            _wait_for(lambda: gated.asked == ["shadowed"], "the student was asked in the background")
            assert not gated.gate.is_set() and read_lines(log_path) == []  # the student has not answered yet
        finally:
            gated.gate.set()
        _wait_for(lambda: read_lines(log_path), "the shadow record landed after the student answered")
    (record,) = read_lines(log_path)
    assert record["meta"]["student_answer"] is not None
    assert [m["content"] for m in record["messages"] if m["role"] == "user"] == ["shadowed"]
