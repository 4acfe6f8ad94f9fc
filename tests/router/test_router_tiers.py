"""Tiers (serve.tiers): student -> mid tier(s) -> teacher, each with its own policy (`make test`).

All real, on loopback, driven by the real openai SDK: the student is the embedded GGUF in
llama-cpp-python (a real model whose answers stop, so a threshold can keep them) or the tiny
random Llama; mid tiers are OpenAI-compatible upstreams built from serve.tiers (the fault server,
whose token log-probs are fixed at -0.25/-0.75, so a tier's confidence is exactly -0.5, and
llama.cpp's server); the teacher is the fault server behind TeacherService.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from support.capture_helpers import LLAMA_ALIAS, free_port, llama_server
from support.fault_server import FaultServer, answer_for
from support.router_helpers import MESSAGES, MODEL, client, read_lines, running, teacher_for

from pipeline.config import ServeConfig, validate_recipe
from pipeline.errors import DistillError
from pipeline.llm.policy import Policy
from pipeline.router.routing import policy_hash

PROMPT = MESSAGES[0]["content"]
KEEP = -100.0  # a student threshold every stopped answer passes
ESCALATE = 0.5  # log-probs are <= 0: every answer scores below it
MID = -0.5  # the fault server's answers: mean of -0.25 and -0.75


@pytest.fixture(scope="module")
def gguf_student():
    from pipeline.llm.loading import embedded_gguf
    from pipeline.router.backends import GgufBackend

    return GgufBackend(embedded_gguf(LLAMA_ALIAS), n_ctx=512)


def policy_file(path, threshold):
    path.write_text(json.dumps(Policy(threshold=threshold).to_json()))
    return path


def tier(tmp_path, name, base_url, threshold, **extra):
    return {
        "name": name,
        "student": f"openai:{name}-model",
        "base_url": base_url,
        "policy": str(policy_file(tmp_path / f"{name}_policy.json", threshold)),
        **extra,
    }


def tiered_app(student, student_threshold, tiers, teacher=None, log_path=None, deadline_s=30.0):
    """The app `distill serve` builds: serve.tiers through build_tiers, then create_app."""
    from pipeline.router.app import create_app
    from pipeline.router.escalations import EscalationLog
    from pipeline.router.settings import ServeSettings
    from pipeline.router.wiring import build_tiers

    built = build_tiers(ServeConfig(tiers=tiers))
    return create_app(
        ServeSettings(max_tokens=8, deadline_s=deadline_s),
        {MODEL: student},
        Policy(threshold=student_threshold),
        teacher=teacher,
        escalations=EscalationLog(log_path) if log_path else None,
        tiers=built,
    )


def ask(url, **kwargs):
    return client(url).chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=8, **kwargs)


def mean(values):
    return sum(values) / len(values)


# ---------------------------------------------------------------- the chain


def test_a_confident_student_answers_and_no_tier_is_asked(gguf_student, tmp_path):
    log_path = tmp_path / "escalations.jsonl"
    with (
        FaultServer() as mid,
        FaultServer() as teacher_server,
        running(
            tiered_app(
                gguf_student, KEEP, [tier(tmp_path, "mid", mid.base_url, -0.6)], teacher_for(teacher_server), log_path
            )
        ) as url,
    ):
        raw = ask(url, logprobs=True)
    reply = raw.parse()
    assert raw.headers["x-distill-route"] == "student" and reply.distill["route"] == "student"
    assert reply.choices[0].message.content != answer_for(PROMPT)  # the GGUF's own words
    own = mean([t.logprob for t in reply.choices[0].logprobs.content])
    assert float(raw.headers["x-distill-confidence"]) == pytest.approx(own, abs=1e-4)
    assert mid.total == 0 and teacher_server.total == 0 and not log_path.exists()


def test_b_a_student_below_threshold_is_answered_by_the_mid_tier(gguf_student, tmp_path):
    log_path = tmp_path / "escalations.jsonl"
    with (
        FaultServer() as mid,
        FaultServer() as teacher_server,
        running(
            tiered_app(
                gguf_student,
                ESCALATE,
                [tier(tmp_path, "mid", mid.base_url, -0.6)],
                teacher_for(teacher_server),
                log_path,
            )
        ) as url,
    ):
        raw = ask(url)
        chunks = list(client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True))
        ready = httpx.get(f"{url}/ready").json()
        (body, _) = mid.bodies
    reply = raw.parse()
    assert raw.headers["x-distill-route"] == "tier:mid" and reply.distill["route"] == "tier:mid"
    assert reply.choices[0].message.content == answer_for(PROMPT)
    # x-distill-confidence is the answering tier's, read by its own policy.
    assert float(raw.headers["x-distill-confidence"]) == pytest.approx(MID)
    assert (
        reply.distill["reason"].startswith("student: mean_logprob")
        and "mid: mean_logprob -0.500 >= threshold -0.600" in reply.distill["reason"]
    )
    # The tier is sent the client's messages, as the student is, with the request's max_tokens.
    assert body["messages"] == MESSAGES and body["max_tokens"] == 8 and body["model"] == "mid-model"
    assert teacher_server.total == 0 and not log_path.exists()  # no teacher answer: nothing to learn from
    # Streamed: decided before the first byte, every chunk names the tier.
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer_for(PROMPT)
    assert {c.distill["route"] for c in chunks} == {"tier:mid"}
    # /ready lists the tier with its own policy, not the student's.
    assert ready["tiers"] == [{"name": "mid", "policy": policy_hash(Policy(threshold=-0.6)), "threshold": -0.6}]
    assert ready["policy"] == reply.distill["policy"] == policy_hash(Policy(threshold=ESCALATE))


def test_c_a_mid_tier_below_its_threshold_goes_to_the_teacher(gguf_student, tmp_path):
    log_path = tmp_path / "escalations.jsonl"
    with (
        FaultServer() as mid,
        FaultServer() as teacher_server,
        running(
            tiered_app(
                gguf_student,
                ESCALATE,
                [tier(tmp_path, "mid", mid.base_url, -0.4)],
                teacher_for(teacher_server),
                log_path,
            )
        ) as url,
    ):
        raw = ask(url, extra_headers={"x-request-id": "req-tier-c"})
    reply = raw.parse()
    assert raw.headers["x-distill-route"] == "teacher" and reply.choices[0].message.content == answer_for(PROMPT)
    assert mid.total == 1 and teacher_server.total == 1
    assert float(raw.headers["x-distill-confidence"]) == pytest.approx(MID)  # the last tier that scored
    (record,) = read_lines(log_path)
    meta = record["meta"]
    assert record["id"] == "req-tier-c" and meta["route"] == "teacher" and meta["confidence"] == pytest.approx(MID)
    student_step, mid_step = meta["tiers"]
    assert student_step["tier"] == "student" and student_step["outcome"] == "escalated"
    assert student_step["confidence"] < 0 and student_step["policy"] == raw.headers["x-distill-policy"]
    assert student_step["answer"] == meta["student_answer"] != answer_for(PROMPT)
    assert mid_step == {
        "tier": "mid",
        "outcome": "escalated",
        "confidence": pytest.approx(MID),
        "reason": "mean_logprob -0.500 < threshold -0.400",
        "policy": mid_step["policy"],
        "answer": answer_for(PROMPT),
    }
    assert len(mid_step["policy"]) == 12 and mid_step["policy"] != student_step["policy"]


@pytest.mark.parametrize("fault", ["down", "500", "slow"])
def test_d_a_mid_tier_that_fails_passes_to_the_teacher_without_5xx(gguf_student, tmp_path, fault):
    log_path = tmp_path / "escalations.jsonl"
    servers = {"500": FaultServer(status=500), "slow": FaultServer(plan={1: "slow"}, slow_s=20.0)}
    mid = servers.get(fault)
    base_url = mid.start().base_url if mid else f"http://127.0.0.1:{free_port()}/v1"  # nothing listens
    extra = {"timeout_s": 1.0} if fault == "slow" else {}
    try:
        with (
            FaultServer() as teacher_server,
            running(
                tiered_app(
                    gguf_student,
                    ESCALATE,
                    [tier(tmp_path, "mid", base_url, -0.6, **extra)],
                    teacher_for(teacher_server),
                    log_path,
                )
            ) as url,
        ):
            raw = ask(url)
    finally:
        if mid:
            mid.stop()
    assert raw.http_response.status_code == 200
    assert raw.headers["x-distill-route"] == "teacher" and raw.parse().choices[0].message.content == answer_for(PROMPT)
    assert teacher_server.total == 1 and (mid is None or mid.total == 1)
    (record,) = read_lines(log_path)
    _, mid_step = record["meta"]["tiers"]
    assert mid_step["tier"] == "mid" and mid_step["outcome"] == "failed"
    assert ("timed out" if fault == "slow" else "BackendUnavailable") in mid_step["error"]
    assert "failed" in raw.parse().distill["reason"]


def test_tiers_are_asked_in_order_and_the_first_kept_answer_wins(gguf_student, tmp_path):
    with (
        FaultServer() as first,
        FaultServer() as second,
        FaultServer() as third,
        FaultServer() as teacher_server,
        running(
            tiered_app(
                gguf_student,
                ESCALATE,
                [
                    tier(tmp_path, "first", first.base_url, -0.4),
                    tier(tmp_path, "second", second.base_url, -0.6),
                    tier(tmp_path, "third", third.base_url, -0.6),
                ],
                teacher_for(teacher_server),
            )
        ) as url,
    ):
        raw = ask(url)
    assert raw.headers["x-distill-route"] == "tier:second"
    assert (first.total, second.total, third.total, teacher_server.total) == (1, 1, 0, 0)
    assert [body["model"] for body in first.bodies + second.bodies] == ["first-model", "second-model"]


def test_teacher_failing_after_the_tiers_gives_the_highest_tiers_answer_as_fallback(gguf_student, tmp_path):
    log_path = tmp_path / "escalations.jsonl"
    with (
        FaultServer() as mid,
        FaultServer(status=500) as teacher_server,
        running(
            tiered_app(
                gguf_student,
                ESCALATE,
                [tier(tmp_path, "mid", mid.base_url, -0.4)],
                teacher_for(teacher_server),
                log_path,
            )
        ) as url,
    ):
        raw = ask(url)
        student_only = tiered_app(
            gguf_student, ESCALATE, [tier(tmp_path, "down", f"http://127.0.0.1:{free_port()}/v1", -0.4)]
        )
        with running(student_only) as bare:  # no teacher, the only tier down: the student's answer
            fallback = ask(bare)
    assert raw.http_response.status_code == 200 and raw.headers["x-distill-route"] == "tier:mid-fallback"
    assert raw.parse().choices[0].message.content == answer_for(PROMPT)  # the mid tier's, not the student's
    assert float(raw.headers["x-distill-confidence"]) == pytest.approx(MID)
    assert "teacher failed" in raw.parse().distill["reason"] and teacher_server.total >= 1
    assert not log_path.exists()  # no teacher answer was obtained
    assert fallback.headers["x-distill-route"] == "student-fallback"
    assert fallback.parse().choices[0].message.content != answer_for(PROMPT)
    assert "no teacher configured" in fallback.parse().distill["reason"]


def test_llama_cpp_server_as_a_real_mid_tier(tiny_llama_dir, gguf_student, tmp_path):
    from pipeline.router.backends import StudentBackend

    student = StudentBackend(tiny_llama_dir)  # a random model: its answers run to max_tokens, so escalate
    want = asyncio.run(gguf_student.complete(MESSAGES, 8))  # what llama.cpp's server answers (same file, greedy)
    log_path = tmp_path / "escalations.jsonl"
    with llama_server(tmp_path / "llama.log") as base_url, FaultServer() as teacher_server:
        keep = {
            "name": "llama",
            "student": f"openai:{LLAMA_ALIAS}",
            "base_url": base_url,
            "policy": str(policy_file(tmp_path / "keep.json", -100.0)),
        }
        with running(tiered_app(student, ESCALATE, [keep], teacher_for(teacher_server))) as url:
            kept = ask(url, logprobs=True, top_logprobs=2)
        passed = {**keep, "policy": str(policy_file(tmp_path / "pass.json", ESCALATE))}
        with running(tiered_app(student, ESCALATE, [passed], teacher_for(teacher_server), log_path)) as url:
            escalated = ask(url)
    reply = kept.parse()
    assert kept.headers["x-distill-route"] == "tier:llama" and reply.choices[0].message.content == want.text
    tokens = reply.choices[0].logprobs.content  # the tier's own tokens reach the client
    assert tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    assert reply.distill["confidence"] == pytest.approx(mean([t.logprob for t in tokens]))
    assert escalated.headers["x-distill-route"] == "teacher" and teacher_server.total == 1
    (record,) = read_lines(log_path)
    student_step, llama_step = record["meta"]["tiers"]
    assert student_step["reason"] == "answer ended by length, not by itself"
    assert llama_step["outcome"] == "escalated" and llama_step["answer"] == want.text
    # (llama.cpp's server scores a repeated prompt a little differently: compare within this request.)
    assert llama_step["confidence"] < 0
    assert float(escalated.headers["x-distill-confidence"]) == pytest.approx(llama_step["confidence"], abs=1e-4)
    assert llama_step["reason"] == f"mean_logprob {llama_step['confidence']:.3f} < threshold 0.500"


def test_without_tiers_the_escalation_record_is_unchanged(gguf_student, tmp_path):
    from pipeline.router.app import create_app
    from pipeline.router.escalations import EscalationLog
    from pipeline.router.settings import ServeSettings

    log_path = tmp_path / "escalations.jsonl"
    with (
        FaultServer() as teacher_server,
        running(
            create_app(
                ServeSettings(max_tokens=8),
                {MODEL: gguf_student},
                Policy(threshold=ESCALATE),
                teacher=teacher_for(teacher_server),
                escalations=EscalationLog(log_path),
            )
        ) as url,
    ):
        raw = ask(url)
        ready = httpx.get(f"{url}/ready").json()
    assert raw.headers["x-distill-route"] == "teacher" and "tiers" not in ready
    (record,) = read_lines(log_path)
    assert "tiers" not in record["meta"] and not raw.parse().distill["reason"].startswith("student:")


# ---------------------------------------------------------------- configuration


def recipe_with(tiers):
    return validate_recipe({"name": "t", "serve": {"tiers": tiers}}, source="r.yaml")


def test_bad_tier_settings_are_refused_naming_the_setting(tmp_path):
    from pipeline.router.wiring import build_tiers

    ok = {
        "name": "mid",
        "student": "openai:m",
        "base_url": "http://127.0.0.1:9/v1",
        "policy": str(policy_file(tmp_path / "p.json", -1.0)),
    }
    with pytest.raises(DistillError, match=r"serve\.tiers\.0\.policy: Field required"):
        recipe_with([{k: v for k, v in ok.items() if k != "policy"}])
    with pytest.raises(DistillError, match=r"serve\.tiers\.0\.student: String should match"):
        recipe_with([{**ok, "student": "vllm:m"}])
    with pytest.raises(DistillError, match=r"tier mid \(student=openai:m\) needs base_url"):
        recipe_with([{k: v for k, v in ok.items() if k != "base_url"}])
    with pytest.raises(DistillError, match=r"tier mid \(student=llama.cpp\) needs gguf"):
        recipe_with([{k: v for k, v in ok.items() if k != "base_url"} | {"student": "llama.cpp"}])
    with pytest.raises(DistillError, match="gguf does not apply to student=openai:m"):
        recipe_with([{**ok, "gguf": "x.gguf"}])
    with pytest.raises(DistillError, match="names must be unique"):
        recipe_with([ok, ok])
    with pytest.raises(DistillError, match="serve.tiers.0.name"):
        recipe_with([{**ok, "name": "has space"}])
    with pytest.raises(DistillError, match=r"serve\.tiers\.1 \(second\)\.policy: .*missing\.json does not exist"):
        build_tiers(recipe_with([ok, {**ok, "name": "second", "policy": str(tmp_path / "missing.json")}]).serve)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DistillError, match=r"serve\.tiers\.0 \(mid\)\.policy: .*not a router policy"):
        build_tiers(recipe_with([{**ok, "policy": str(tmp_path / "broken.json")}]).serve)
    with pytest.raises(DistillError, match=r"serve\.tiers\.0 \(mid\)\.model_dir: .* no config.json"):
        build_tiers(
            recipe_with(
                [{"name": "mid", "student": "transformers", "model_dir": str(tmp_path), "policy": ok["policy"]}]
            ).serve
        )
    with pytest.raises(DistillError, match=r"serve\.tiers\.0 \(mid\): .*no API key in \$DISTILL_TEST_UNSET_KEY"):
        build_tiers(
            recipe_with(
                [{**ok, "base_url": "https://api.example.com/v1", "api_key_env": "DISTILL_TEST_UNSET_KEY"}]
            ).serve
        )
    label = tmp_path / "label.json"
    label.write_text(json.dumps(Policy(threshold=0.5, signal="label_prob", labels=("a", "b")).to_json()))
    with pytest.raises(DistillError, match=r"serve\.tiers\.0 \(mid\): .*only serve.student=transformers"):
        build_tiers(recipe_with([{**ok, "policy": str(label)}]).serve)


def test_tier_settings_build_their_backends(tmp_path):
    from pipeline.llm.loading import embedded_gguf
    from pipeline.router.backends import GgufBackend, UpstreamBackend
    from pipeline.router.wiring import build_tiers

    policy = policy_file(tmp_path / "p.json", -0.7)
    upstream, local = build_tiers(
        recipe_with(
            [
                {
                    "name": "mid",
                    "student": "openai:m",
                    "base_url": "http://127.0.0.1:9/v1",
                    "policy": str(policy),
                    "timeout_s": 3,
                },
                {
                    "name": "gguf",
                    "student": "llama.cpp",
                    "gguf": str(embedded_gguf(LLAMA_ALIAS)),
                    "policy": str(policy),
                },
            ]
        ).serve
    )
    assert isinstance(upstream.backend, UpstreamBackend) and upstream.backend.base_url == "http://127.0.0.1:9/v1"
    assert upstream.route == "tier:mid" and upstream.timeout_s == 3 and upstream.policy.threshold == -0.7
    assert upstream.policy_hash == policy_hash(Policy(threshold=-0.7))
    assert isinstance(local.backend, GgufBackend) and local.timeout_s is None
    local.backend.gguf.close()
    assert build_tiers(ServeConfig()) == ()
