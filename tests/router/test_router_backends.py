"""Student backends other than in-process transformers, each real, on loopback (`make test`):
the GGUF export in llama-cpp-python (in process) and an OpenAI-compatible upstream (llama.cpp's
server as a subprocess, the fault server for failures). Each returns per-token logprobs, so the
policy reads a confidence from it as from the transformers student.
"""

from __future__ import annotations

import math

import openai
import pytest
from support.capture_helpers import LLAMA_ALIAS, llama_server
from support.fault_server import FaultServer, answer_for
from support.router_helpers import MESSAGES, MODEL, client, running

from pipeline.config import TeacherConfig
from pipeline.llm.policy import Policy


@pytest.fixture(scope="module")
def gguf_path():
    from pipeline.llm.loading import embedded_gguf

    return embedded_gguf(LLAMA_ALIAS)


@pytest.fixture(scope="module")
def gguf_student(gguf_path):
    from pipeline.router.backends import GgufBackend

    return GgufBackend(gguf_path, n_ctx=512)


def serve(student, policy):
    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    return running(create_app(ServeSettings(max_tokens=8), {MODEL: student}, policy))


def test_gguf_student_decodes_as_the_export_check_does_and_scores_every_token(gguf_student):
    import asyncio

    reference = gguf_student.gguf  # pipeline/export/parity.py's decoder on the same file
    want = reference.answer(reference.tokenize(reference.render(MESSAGES)), 8)
    got = asyncio.run(gguf_student.complete(MESSAGES, 8, top_logprobs=3))
    assert got.token_ids == want.token_ids and got.text == want.text and got.text
    assert got.finish_reason == want.finish_reason
    assert len(got.token_logprobs) == len(got.token_ids) and all(-30 < v <= 0 for v in got.token_logprobs)
    for token, lp in zip(got.tokens, got.token_logprobs):
        assert token.logprob == lp and token.top_logprobs[0].token == token.token  # greedy: its own best
        assert [a.logprob for a in token.top_logprobs] == sorted((a.logprob for a in token.top_logprobs), reverse=True)
        assert sum(math.exp(a.logprob) for a in token.top_logprobs) <= 1 + 1e-6  # a real distribution
    assert bytes(b for t in got.tokens for b in t.bytes).decode().strip() == got.text
    cut = asyncio.run(gguf_student.complete(MESSAGES, 2))  # no logprobs asked: a plain Completion
    assert cut.token_ids == want.token_ids[:2] and cut.finish_reason == "length" and not hasattr(cut, "tokens")


def test_the_policy_reads_the_gguf_students_confidence(gguf_student):
    with serve(gguf_student, Policy(threshold=-100.0)) as url:
        raw = client(url).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2
        )
    reply = raw.parse()
    tokens = reply.choices[0].logprobs.content
    mean = sum(t.logprob for t in tokens) / len(tokens)
    assert reply.distill["route"] == "student" and reply.distill["confidence"] == pytest.approx(mean)
    assert len(tokens) == reply.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    with serve(gguf_student, Policy(threshold=mean + 0.01)) as url:  # just above this answer's confidence
        reply = client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert reply.distill["route"] == "student-fallback" and "threshold" in reply.distill["reason"]


def upstream(base_url: str, **extra):
    from pipeline.router.backends import UpstreamBackend

    return UpstreamBackend(TeacherConfig(spec=f"openai:{LLAMA_ALIAS}", base_url=base_url, timeout_s=120, **extra))


def test_upstream_student_on_llama_cpp_server_matches_the_gguf_in_process(gguf_student, tmp_path):
    import asyncio

    local = asyncio.run(gguf_student.complete(MESSAGES, 8, top_logprobs=2))
    with llama_server(tmp_path / "llama.log") as base_url, serve(upstream(base_url), Policy(threshold=-100.0)) as url:
        raw = client(url).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2
        )
    reply = raw.parse()
    tokens = reply.choices[0].logprobs.content
    # The same file, greedy both times: the same answer, token for token, and close log-probs.
    assert reply.choices[0].message.content == local.text
    assert [t.token for t in tokens] == [t.token for t in local.tokens]
    for served, mine in zip(tokens, local.tokens):
        assert served.logprob == pytest.approx(mine.logprob, abs=0.05)
        assert served.top_logprobs and served.top_logprobs[0].token == served.token
    assert reply.distill["route"] == "student" and raw.headers["x-distill-confidence"] != "none"
    assert reply.distill["confidence"] == pytest.approx(sum(t.logprob for t in tokens) / len(tokens))


def test_upstream_student_reads_logprobs_and_fails_as_a_503_without_its_key(monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_UPSTREAM_KEY", "sk-test-abcdefghijklmnop")
    with (
        FaultServer() as server,
        serve(upstream(server.base_url, api_key_env="DISTILL_TEST_UPSTREAM_KEY"), Policy(threshold=-0.6)) as url,
    ):
        reply = client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True)
        (body,) = server.bodies
    assert reply.choices[0].message.content == answer_for(MESSAGES[0]["content"])
    assert [t.token for t in reply.choices[0].logprobs.content] == ["ans", "-x"]
    assert reply.distill["confidence"] == pytest.approx(-0.5) and reply.distill["route"] == "student"
    assert body["max_tokens"] == 4 and body["logprobs"] is True and body["temperature"] == 0.0
    with (
        FaultServer(status=500) as server,
        serve(upstream(server.base_url, api_key_env="DISTILL_TEST_UPSTREAM_KEY"), Policy(threshold=-0.6)) as url,
    ):
        with pytest.raises(openai.InternalServerError) as err:
            client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert err.value.status_code == 503 and err.value.code == "backend_unavailable"
    assert "sk-test-abcdefghijklmnop" not in err.value.message


def test_serve_student_setting_picks_the_backend_and_refuses_what_cannot_work(gguf_path, tmp_path):
    from pipeline.config import ServeConfig
    from pipeline.errors import DistillError
    from pipeline.router.backends import GgufBackend, UpstreamBackend
    from pipeline.router.wiring import export_gguf_file, student_for

    export = tmp_path / "export"
    (export / "merged").mkdir(parents=True)
    (export / "gguf").mkdir()
    with pytest.raises(DistillError, match="no GGUF to serve"):
        export_gguf_file(export)
    (export / "gguf" / "model-q8_0.gguf").symlink_to(gguf_path)
    (export / "gguf" / "model-q4_k_m.gguf").symlink_to(gguf_path)
    assert export_gguf_file(export).name == "model-q8_0.gguf"  # several: the near-lossless one
    (export / "gguf" / "model-q8_0.gguf").unlink()
    (export / "gguf" / "model-f16.gguf").symlink_to(gguf_path)
    with pytest.raises(DistillError, match="choose one with serve.student_gguf"):
        export_gguf_file(export)

    student = student_for(
        export / "merged", Policy(threshold=-1.0), ServeConfig(student="llama.cpp", student_gguf=gguf_path)
    )
    assert isinstance(student, GgufBackend) and student.path == gguf_path
    student.gguf.close()
    cfg = ServeConfig(student="openai:served-student", student_base_url="http://127.0.0.1:9/v1")
    assert isinstance(student_for(export / "merged", Policy(threshold=-1.0), cfg), UpstreamBackend)
    label_policy = Policy(threshold=0.5, signal="label_prob", labels=("damaged", "late"))
    with pytest.raises(DistillError, match="only serve.student=transformers"):
        student_for(export / "merged", label_policy, cfg)
