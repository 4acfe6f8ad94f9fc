"""`openai:<model>`: any OpenAI-compatible chat-completions API through the official SDK.

    distill capture RECIPE teacher.spec=openai:gpt-4o-mini
    distill capture RECIPE teacher.spec=openai:smollm2 teacher.base_url=http://127.0.0.1:8080/v1

The SDK's own retries are off (max_retries=0): `dispatch.py` retries with tenacity, so one
policy (and one count of attempts) covers every provider. SDK errors become our
TeacherCallError / TeacherAuthError by type and status code, never by message text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from pipeline.llm.completion import Completion
from pipeline.teachers.errors import TeacherCallError, status_error, transport_error, unreadable_error
from pipeline.teachers.keys import public_url, resolve_api_key, scrub
from pipeline.teachers.ledger import resolve_price
from pipeline.teachers.sdk import SdkClient

log = logging.getLogger(__name__)


class OpenAITeacher:
    in_process = False
    KEY_ENV = "OPENAI_API_KEY"
    forwards = frozenset(
        {"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "response_format"}
    )

    def __init__(self, model: str, cfg, api_key: str, labels: list[str] | None = None, schema: dict | None = None):
        self.spec = f"openai:{model}"
        self.model = model
        self.base_url = cfg.base_url
        self.max_new_tokens = cfg.max_new_tokens
        self.temperature = cfg.temperature
        self.price = resolve_price("openai", model, cfg)
        self.notes: list[str] = []
        # Structured output constrained to the task's labels (classification): llama.cpp, vLLM
        # and OpenAI accept a JSON-schema enum, so no call is paid for an answer outside the set.
        self.labels = labels if labels and cfg.constrain_to_labels else None
        # An extraction task's output_schema, sent as strict structured output (the answer is the JSON).
        self.schema = schema if schema and cfg.constrain_to_schema and not self.labels else None
        self._asking = Asking(
            # The first format OpenAI, vLLM and llama.cpp's llama-server take; the second is
            # llama-cpp-python's server's; then unconstrained.
            schema_modes=("json_schema", "json_object", None) if self.labels or self.schema else (None,),
            logprobs=cfg.logprobs and not REASONING_MODEL.match(model),  # reasoning models refuse logprobs
        )
        self._sdk = SdkClient("openai", api_key, cfg.base_url, cfg.timeout_s)

    @classmethod
    def from_config(cls, model: str, cfg, labels: list[str] | None = None, schema: dict | None = None) -> OpenAITeacher:
        return cls(
            model, cfg, api_key=resolve_api_key(f"openai:{model}", cfg, cls.KEY_ENV), labels=labels, schema=schema
        )

    def __repr__(self) -> str:
        return f"OpenAITeacher({self.spec!r}, base_url={public_url(self.base_url)!r})"

    def identity(self) -> dict[str, Any]:
        # base_url is part of the identity: the same model name on two servers is two teachers.
        return {
            "provider": "openai",
            "model": self.model,
            "base_url": public_url(self.base_url),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            **({"constrained_to": self.labels} if self.labels else {}),
            **({"constrained_to_schema": self.schema} if self.schema else {}),
        }

    async def aclose(self) -> None:
        await self._sdk.aclose()

    async def complete(self, messages: list[dict], params: dict | None = None) -> Completion:
        """One chat completion; raises TeacherCallError (maybe retryable) or TeacherAuthError.
        `params`: the client's own (the proxy), sent as given; the label constraint then stays off."""
        import openai

        start = time.perf_counter()
        refused: openai.APIStatusError | None = None
        first_call, self._asking.first_call = self._asking.first_call, False
        skip_mode: list[str | None] = []
        for variant in self._asking.ladder():
            if variant[0] in skip_mode:
                continue
            try:
                response = await self._create(messages, variant, params)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
                # Some compatible servers reject `logprobs` or a `response_format` shape: ask
                # again with less, one step at a time; the request that works says what was refused.
                refused = refused or err
                continue
            except openai.InternalServerError as err:
                # llama-cpp-python's server answers a response_format shape it does not know with
                # a 500. Only on the teacher's very first call (sent alone, before any fan-out)
                # is a 500 taken as refusing that shape; everywhere else it is a fault to retry.
                if not (first_call and variant[0] is not None):
                    raise self._translate(err) from None
                refused = refused or err
                skip_mode.append(variant[0])
                continue
            except openai.OpenAIError as err:
                raise self._translate(err) from None
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                # A body cut off mid-JSON (proxy reset, server crash) is worth another try.
                raise unreadable_error(type(err).__name__) from None
            for note in self._asking.settle(variant):
                assert refused is not None  # a note means this call stepped down the ladder: it was refused first
                log.warning("%s %s (HTTP %s)", self.spec, note.removeprefix("the server "), refused.status_code)
                self.notes.append(note)
            return self._to_completion(response, int((time.perf_counter() - start) * 1000), unwrap=params is None)
        raise self._translate(refused) from None

    async def complete_batch(self, conversations: list[list[dict]]) -> list[Completion]:
        """Unthrottled, unretried; the service goes through dispatch.py instead."""
        return list(await asyncio.gather(*(self.complete(c) for c in conversations)))

    async def _create(self, messages: list[dict], variant: tuple[str | None, bool], sent: dict | None = None):
        schema_mode, logprobs = variant
        if sent is not None:
            params = forwarded_params(self.model, sent, logprobs)
        else:
            params = request_params(self.model, self.max_new_tokens, self.temperature, logprobs)
            if schema_mode is not None and self.labels:
                params["response_format"] = label_format(self.labels, schema_mode)
            elif schema_mode is not None:
                assert self.schema is not None  # Asking offers a schema mode only with labels or a schema
                params["response_format"] = schema_format(self.schema, schema_mode)
        return await self._sdk.get().chat.completions.create(model=self.model, messages=messages, **params)

    def _to_completion(self, response, latency_ms: int, unwrap: bool = True) -> Completion:
        if not getattr(response, "choices", None):
            raise unreadable_error("no choices")
        choice = response.choices[0]
        usage = response.usage
        text = (choice.message.content or "").strip()
        return Completion(
            text=unwrap_label(text, self.labels) if self.labels and unwrap else text,
            source=self.spec,
            prompt_tokens=(usage.prompt_tokens or 0) if usage else None,
            completion_tokens=(usage.completion_tokens or 0) if usage else None,
            token_logprobs=_token_logprobs(choice),
            latency_ms=latency_ms,
            finish_reason=choice.finish_reason or "stop",
        )

    def _translate(self, err) -> Exception:
        return translate_error(err, self._sdk.api_key, self.spec)


# OpenAI's reasoning models (o1, o3, o4-mini, gpt-5 and their snapshots) reject `max_tokens`,
# `temperature` and `logprobs`: they take `max_completion_tokens` and sample as they must.
REASONING_MODEL = re.compile(r"^(o\d+|gpt-5)([-.].*)?$")


def request_params(model: str, max_new_tokens: int, temperature: float, logprobs: bool) -> dict[str, Any]:
    """What this model accepts of our generation settings, as chat-completions parameters."""
    if REASONING_MODEL.match(model):
        return {"max_completion_tokens": max_new_tokens}
    # top_logprobs=0 asks for nothing extra from OpenAI, but llama.cpp only returns token
    # logprobs when the field is present.
    extra = {"logprobs": True, "top_logprobs": 0} if logprobs else {}
    return {"max_tokens": max_new_tokens, "temperature": temperature, **extra}


def forwarded_params(model: str, sent: dict, logprobs: bool) -> dict[str, Any]:
    """A client's own parameters as its request sent them, plus token logprobs when the teacher asks
    for them (they change nothing in the answer); a reasoning model's max_tokens under its name."""
    params = dict(sent)
    if REASONING_MODEL.match(model):
        if "max_tokens" in params:
            params["max_completion_tokens"] = params.pop("max_tokens")
        return params
    if logprobs:
        params.update(logprobs=True, top_logprobs=0)
    return params


@dataclass
class Asking:
    """What a teacher still asks its server for: the response_format shape (a mode, None for
    none) and logprobs. A server that refuses one is asked with less from then on."""

    schema_modes: tuple[str | None, ...]
    logprobs: bool
    confirmed: bool = False  # some request has worked: later errors are faults, not refusals
    first_call: bool = True  # no call has been made yet

    def ladder(self) -> list[tuple[str | None, bool]]:
        """Variants to try while the server refuses, most wanted first: each schema mode with,
        then without logprobs (the feature most often missing), then the next mode. Once one
        has worked, only it: a later 400 is about that prompt, not a feature."""
        steps = [(mode, lp) for mode in self.schema_modes for lp in dict.fromkeys((self.logprobs, False))]
        return steps if not self.confirmed else steps[:1]

    def settle(self, variant: tuple[str | None, bool]) -> list[str]:
        """`variant` worked: ask for just that from now on; returns a note per refused feature
        (none when this call was refused nothing, e.g. a concurrent call already settled it)."""
        mode, logprobs = variant
        notes: list[str] = []
        if mode not in self.schema_modes:
            return notes  # a concurrent call already settled on a mode further down the ladder
        if mode != self.schema_modes[0]:
            notes.append(
                "the server refused response_format "
                + str(self.schema_modes[0])
                + ("; answers are not constrained (curate checks them)" if mode is None else f"; using {mode}")
            )
            self.schema_modes = self.schema_modes[self.schema_modes.index(mode) :]
        if self.logprobs and not logprobs:
            notes.append("the server refused logprobs; answers carry none")
            self.logprobs = False
        self.confirmed = True
        return notes


def label_format(labels: list[str], mode: str) -> dict[str, Any]:
    """`response_format` for an answer that must be one of `labels`. OpenAI's strict mode wants
    an object at the root, so the label sits in {"label": ...}."""
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": list(labels)}},
        "required": ["label"],
        "additionalProperties": False,
    }
    if mode == "json_object":  # llama-cpp-python's server: the schema beside the type
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": schema}}


def schema_format(schema: dict[str, Any], mode: str) -> dict[str, Any]:
    """`response_format` for an answer that must be JSON valid against `schema`: OpenAI's strict
    structured outputs (the schema must then require every property and forbid others, as the
    demo's does), or llama-cpp-python's server's json_object with the schema beside the type."""
    if mode == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "record", "strict": True, "schema": schema}}


def unwrap_label(text: str, labels: list[str]) -> str:
    """{"label": "x"} -> x. Anything else (a server that ignored the schema, an answer cut off
    at max_new_tokens) is returned as it came, for curate's format step to judge."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    label = value.get("label") if isinstance(value, dict) else None
    return label if isinstance(label, str) and label in labels else text


def translate_error(err, api_key: str | None, spec: str) -> Exception:
    """SDK exception -> ours, by class and status. Shared shape with anthropic.py, whose SDK
    mirrors these names, but kept per module: the two SDKs' classes are distinct."""
    import openai

    if isinstance(err, openai.APIConnectionError):  # APITimeoutError is one too
        return transport_error(err, isinstance(err, openai.APITimeoutError), public_url(str(err.request.url)))
    if isinstance(err, openai.APIStatusError):
        return status_error(err.status_code, err.response.headers, scrub(str(err.message), api_key), spec)
    if isinstance(err, openai.APIResponseValidationError):
        return unreadable_error("not the chat-completions shape")
    return TeacherCallError(scrub(f"{type(err).__name__}: {err}", api_key))


def _token_logprobs(choice) -> list[float] | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    values = [t.logprob for t in content or [] if t.logprob is not None and math.isfinite(t.logprob)]
    return values or None
