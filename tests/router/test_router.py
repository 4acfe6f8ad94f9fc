"""The router serves a real model over real HTTP to the real OpenAI SDK (`make test`)."""

from __future__ import annotations

import logging

import openai
import pytest
from support.router_helpers import MESSAGES, MODEL, client, running

from pipeline.errors import DistillError
from pipeline.llm.policy import Policy

KEY = "sk-test-router"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def backend(tiny_llama_dir):
    from pipeline.router.backends import StudentBackend

    return StudentBackend(tiny_llama_dir)


@pytest.fixture(scope="module")
def base_url(backend):
    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    with running(create_app(ServeSettings(max_tokens=8), {MODEL: backend}, Policy.student_only())) as url:
        yield url


@pytest.fixture(scope="module")
def auth_url(backend):
    from pydantic import SecretStr

    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    settings = ServeSettings(api_keys=(SecretStr(KEY),), max_tokens=8)
    with running(create_app(settings, {MODEL: backend}, Policy(threshold=0.0))) as url:
        yield url


def test_chat_completion_shape_and_usage(base_url, tiny_llama_dir):
    from pipeline.llm.loading import load_tokenizer

    raw = client(base_url).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
    )
    reply = raw.parse()
    assert raw.headers["x-distill-route"] == "student"  # a student-only policy never escalates
    assert reply.distill["route"] == "student" and reply.distill["request_id"] == raw.headers["x-request-id"]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    (choice,) = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert reply.usage.prompt_tokens == len(expected) > 0
    assert 0 < reply.usage.completion_tokens <= MAX_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_answer_equals_direct_greedy_generation(base_url, tiny_llama_dir):
    from pipeline.llm.generate import generate_batch
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    reply = client(base_url).chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=MAX_TOKENS)
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    (direct,) = generate_batch(load_model(str(tiny_llama_dir), device_plan()), tokenizer, [MESSAGES], MAX_TOKENS)
    assert reply.choices[0].message.content == direct.text
    assert reply.usage.completion_tokens == direct.completion_tokens
    assert reply.choices[0].finish_reason == ("stop" if direct.stopped else "length")


def test_unknown_model_is_404_not_a_fallback(base_url):
    with pytest.raises(openai.NotFoundError) as err:
        client(base_url).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    assert MODEL in err.value.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"max_tokens": 9}, "max_tokens"),
        ({"temperature": 0.7}, "temperature"),
        ({"top_p": 0.5}, "top_p"),
    ],
)
def test_unsupported_options_are_400(base_url, extra, param):
    kwargs = {"max_tokens": MAX_TOKENS, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client(base_url).chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)
    assert err.value.type == "invalid_request_error" and err.value.param == param


def test_malformed_request_is_400_in_openai_envelope(base_url):
    bad = [{"role": "wizard", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        client(base_url).chat.completions.create(model=MODEL, messages=bad, max_tokens=MAX_TOKENS)
    assert err.value.param == "messages.0.role"


def test_unknown_fields_are_accepted_and_logged(base_url, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.router")
    reply = client(base_url).chat.completions.create(
        model=MODEL,
        messages=[{**MESSAGES[0], "name": "alice"}],
        max_tokens=2,
        seed=7,
        temperature=0,
        extra_body={"frobnicate": {"level": 3}},
    )
    assert reply.choices[0].message.role == "assistant"
    ignored = [r.getMessage() for r in caplog.records if "ignoring unsupported" in r.getMessage()]
    # seed and temperature=0 are honoured (greedy decoding is deterministic), so not "ignored".
    assert ignored == ["ignoring unsupported request fields: 'frobnicate', 'messages[].name'"]


def test_models_list_and_health(base_url):
    import httpx

    models = client(base_url).models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok", "models": [MODEL]}


def test_bearer_auth(auth_url):
    with pytest.raises(openai.AuthenticationError) as err:
        client(auth_url, key="sk-wrong").models.list()
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(auth_url, key="sk-wrong").chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    raw = client(auth_url, key=KEY).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=2
    )
    assert raw.parse().choices[0].message.role == "assistant"
    # A random model is far from confident: mean log-prob < 0 = threshold, so the policy escalates;
    # with no teacher configured the student's answer comes back, marked as such.
    assert raw.headers["x-distill-route"] == "student-fallback"


def test_no_threshold_escalates_every_request_through_the_served_app(backend):
    """Evaluation writes threshold null when no threshold met the quality target: the router must
    then escalate everything (fail closed), read from the very file evaluate writes."""
    import json
    import tempfile
    from pathlib import Path

    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "router_policy.json"
        path.write_text(json.dumps({"threshold": None, "signal": "mean_logprob", "quality_target": 0.99}))
        policy = Policy.load(path)
    with running(create_app(ServeSettings(max_tokens=8), {MODEL: backend}, policy)) as url:
        routes = {
            client(url)
            .chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=2
            )
            .headers["x-distill-route"]
            for text in ("where is my parcel", "refund please", "hello")
        }
    assert routes == {"student-fallback"}  # escalated; no teacher here (tests/router/test_router_escalation.py has one)


def test_serve_without_export_says_what_to_run(tmp_path):
    from pipeline.config import ServeConfig
    from pipeline.router.wiring import serve

    with pytest.raises(DistillError, match="make export"):
        serve(tmp_path, Policy.student_only(), ServeConfig())


def test_api_key_env_must_be_set(monkeypatch):
    from pipeline.router.settings import read_api_keys

    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    with pytest.raises(DistillError, match="DISTILL_TEST_KEY"):
        read_api_keys("DISTILL_TEST_KEY")
    monkeypatch.setenv("DISTILL_TEST_KEY", " , ")  # only separators: still no key
    with pytest.raises(DistillError, match="DISTILL_TEST_KEY"):
        read_api_keys("DISTILL_TEST_KEY")
    monkeypatch.setenv("DISTILL_TEST_KEY", KEY)
    (key,) = read_api_keys("DISTILL_TEST_KEY")
    assert key.get_secret_value() == KEY and KEY not in repr(key)


def test_oversize_body_and_too_many_messages_are_refused(backend):
    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    settings = ServeSettings(max_tokens=8, max_body_bytes=2000, max_messages=3)
    with running(create_app(settings, {MODEL: backend}, Policy.student_only())) as url:
        with pytest.raises(openai.APIStatusError) as err:
            client(url).chat.completions.create(
                model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x" * 3000}]
            )
        assert err.value.status_code == 413 and err.value.code == "body_too_large"
        with pytest.raises(openai.BadRequestError) as err:
            client(url).chat.completions.create(model=MODEL, max_tokens=2, messages=MESSAGES * 4)
        assert err.value.param == "messages"
