"""`anthropic:<model>`: Anthropic's Messages API through the official SDK.

    distill capture RECIPE teacher.spec=anthropic:claude-3-5-haiku-latest

The Messages API takes the system prompt as its own parameter, not as a turn, so it is split
off here. No logprobs (the API has none). The SDK's retries are off: dispatch.py retries.
`teacher.base_url` is the API root without /v1 (the SDK adds /v1/messages).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from pipeline.llm.completion import Completion
from pipeline.teachers.errors import TeacherCallError, status_error, transport_error, unreadable_error
from pipeline.teachers.keys import public_url, resolve_api_key, scrub
from pipeline.teachers.ledger import resolve_price
from pipeline.teachers.sdk import SdkClient

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


class AnthropicTeacher:
    in_process = False
    KEY_ENV = "ANTHROPIC_API_KEY"
    forwards = frozenset({"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop"})

    def __init__(self, model: str, cfg, api_key: str):
        self.spec = f"anthropic:{model}"
        self.model = model
        self.base_url = cfg.base_url
        self.max_new_tokens = cfg.max_new_tokens
        self.temperature = cfg.temperature
        self.price = resolve_price("anthropic", model, cfg)
        self.notes: list[str] = []  # nothing to learn at run time: the API never has logprobs
        self._sdk = SdkClient("anthropic", api_key, cfg.base_url, cfg.timeout_s)

    @classmethod
    def from_config(
        cls, model: str, cfg, labels: list[str] | None = None, schema: dict | None = None
    ) -> AnthropicTeacher:
        # Labels and a schema are not sent: the answers are checked by curate's format step.
        return cls(model, cfg, api_key=resolve_api_key(f"anthropic:{model}", cfg, cls.KEY_ENV))

    def __repr__(self) -> str:
        return f"AnthropicTeacher({self.spec!r}, base_url={public_url(self.base_url)!r})"

    def identity(self) -> dict[str, Any]:
        return {
            "provider": "anthropic",
            "model": self.model,
            "base_url": public_url(self.base_url),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }

    async def aclose(self) -> None:
        await self._sdk.aclose()

    async def complete(self, messages: list[dict], params: dict | None = None) -> Completion:
        """One Messages call; raises TeacherCallError (maybe retryable) or TeacherAuthError."""
        import anthropic

        system, turns = split_system(messages)
        sent = params or {}
        # Recent SDKs no longer list `temperature` as a parameter, while the API's default
        # is 1.0: sent in the body so temperature=0 still means greedy. A client's own
        # parameters (the proxy) go as it sent them: no temperature means the API's default.
        body = (
            {k: sent[k] for k in ("temperature", "top_p") if k in sent} if params else {"temperature": self.temperature}
        )
        stop = sent.get("stop")
        if stop:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        start = time.perf_counter()
        try:
            response = await self._sdk.get().messages.create(
                model=self.model,
                max_tokens=sent.get("max_completion_tokens") or sent.get("max_tokens") or self.max_new_tokens,
                messages=turns,
                **({"system": system} if system else {}),
                extra_body=body,
            )
        except anthropic.AnthropicError as err:
            raise self._translate(err) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise unreadable_error(type(err).__name__) from None
        return self._to_completion(response, int((time.perf_counter() - start) * 1000))

    async def complete_batch(self, conversations: list[list[dict]]) -> list[Completion]:
        """Unthrottled, unretried; the service goes through dispatch.py instead."""
        return list(await asyncio.gather(*(self.complete(c) for c in conversations)))

    def _to_completion(self, response, latency_ms: int) -> Completion:
        text = "".join(block.text for block in response.content if getattr(block, "type", "") == "text")
        usage = response.usage
        return Completion(
            text=text.strip(),
            source=self.spec,
            prompt_tokens=usage.input_tokens or 0,
            completion_tokens=usage.output_tokens or 0,
            latency_ms=latency_ms,
            finish_reason=STOP_REASONS.get(response.stop_reason or "", response.stop_reason or "stop"),
        )

    def _translate(self, err) -> Exception:
        import anthropic

        if isinstance(err, anthropic.APIConnectionError):  # APITimeoutError is one too
            return transport_error(err, isinstance(err, anthropic.APITimeoutError), public_url(str(err.request.url)))
        if isinstance(err, anthropic.APIStatusError):
            return status_error(
                err.status_code, err.response.headers, scrub(str(err.message), self._sdk.api_key), self.spec
            )
        if isinstance(err, anthropic.APIResponseValidationError):
            return unreadable_error("not the Messages shape")
        return TeacherCallError(scrub(f"{type(err).__name__}: {err}", self._sdk.api_key))


def split_system(messages: list[dict]) -> tuple[str, list[dict]]:
    """System turns become the `system` parameter; the rest stay in order."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return system, [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
