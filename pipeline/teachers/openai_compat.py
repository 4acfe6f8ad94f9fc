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
import time
from typing import Any

from pipeline.llm.completion import Completion
from pipeline.teachers.errors import TeacherCallError, status_error
from pipeline.teachers.keys import public_url, resolve_api_key, scrub
from pipeline.teachers.ledger import resolve_price

log = logging.getLogger(__name__)


class OpenAITeacher:
    in_process = False
    KEY_ENV = "OPENAI_API_KEY"

    def __init__(self, model: str, cfg, api_key: str):
        self.spec = f"openai:{model}"
        self.model = model
        self.base_url = cfg.base_url
        self.max_new_tokens = cfg.max_new_tokens
        self.temperature = cfg.temperature
        self.timeout_s = cfg.timeout_s
        self.price = resolve_price("openai", model, cfg)
        self.notes: list[str] = []
        self._want_logprobs = cfg.logprobs
        self._api_key = api_key  # kept off identity(), repr and every message
        self._client = None

    @classmethod
    def from_config(cls, model: str, cfg, labels: list[str] | None = None) -> OpenAITeacher:
        # labels: a remote model is told the labels by the task's instructions, not constrained to them.
        return cls(model, cfg, api_key=resolve_api_key(f"openai:{model}", cfg, cls.KEY_ENV))

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
        }

    def _get_client(self):
        if self._client is None:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(
                api_key=self._api_key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def complete(self, messages: list[dict]) -> Completion:
        """One chat completion; raises TeacherCallError (maybe retryable) or TeacherAuthError."""
        import openai

        start = time.perf_counter()
        asked = self._want_logprobs  # another call may flip it while this one is in flight
        try:
            response = await self._create(messages, asked)
        except openai.BadRequestError as err:
            if not asked:
                raise self._translate(err) from None
            # Some compatible servers reject `logprobs`: ask once more without. Only when that
            # works was logprobs the problem, and later calls stop asking for them.
            try:
                response = await self._create(messages, False)
            except openai.OpenAIError as again:
                raise self._translate(again) from None
            if self._want_logprobs:  # concurrent calls can all be refused; say it once
                log.warning("%s refused logprobs (HTTP %s); continuing without them", self.spec, err.status_code)
                self.notes.append("the server refused logprobs; answers carry none")
            self._want_logprobs = False
        except openai.OpenAIError as err:
            raise self._translate(err) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            # A body cut off mid-JSON (proxy reset, server crash) is worth another try.
            raise TeacherCallError(f"unreadable response: {type(err).__name__}", retryable=True) from None
        return self._to_completion(response, int((time.perf_counter() - start) * 1000))

    async def complete_batch(self, conversations: list[list[dict]]) -> list[Completion]:
        """Unthrottled, unretried; the service goes through dispatch.py instead."""
        return list(await asyncio.gather(*(self.complete(c) for c in conversations)))

    async def _create(self, messages: list[dict], logprobs: bool):
        # top_logprobs=0 asks for nothing extra from OpenAI, but llama.cpp only returns token
        # logprobs when the field is present.
        extra = {"logprobs": True, "top_logprobs": 0} if logprobs else {}
        return await self._get_client().chat.completions.create(
            model=self.model,
            messages=messages,
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            **extra,
        )

    def _to_completion(self, response, latency_ms: int) -> Completion:
        if not getattr(response, "choices", None):
            raise TeacherCallError("response has no choices", retryable=True)
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=(choice.message.content or "").strip(),
            source=self.spec,
            prompt_tokens=(usage.prompt_tokens or 0) if usage else None,
            completion_tokens=(usage.completion_tokens or 0) if usage else None,
            token_logprobs=_token_logprobs(choice),
            latency_ms=latency_ms,
            finish_reason=choice.finish_reason or "stop",
        )

    def _translate(self, err) -> Exception:
        return translate_error(err, self._api_key, self.spec)


def translate_error(err, api_key: str | None, spec: str) -> Exception:
    """SDK exception -> ours, by class and status. Shared shape with anthropic.py, whose SDK
    mirrors these names, but kept per module: the two SDKs' classes are distinct."""
    import openai

    if isinstance(err, openai.APITimeoutError):
        return TeacherCallError("timed out", retryable=True)
    if isinstance(err, openai.APIConnectionError):
        return TeacherCallError(f"connection failed: {type(err.__cause__).__name__}", retryable=True)
    if isinstance(err, openai.APIStatusError):
        return status_error(err.status_code, err.response.headers, scrub(str(err.message), api_key), spec)
    if isinstance(err, openai.APIResponseValidationError):
        return TeacherCallError("response did not match the chat-completions shape", retryable=True)
    return TeacherCallError(scrub(f"{type(err).__name__}: {err}", api_key))


def _token_logprobs(choice) -> list[float] | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    values = [t.logprob for t in content or [] if t.logprob is not None and math.isfinite(t.logprob)]
    return values or None
