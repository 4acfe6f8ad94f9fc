"""Provider batch APIs behind one small interface, through the official SDKs.

    distill capture RECIPE teacher.spec=openai:gpt-4o-mini teacher.mode=batch

Used only by batch.py. OpenAI: the batch input is a JSONL file uploaded with purpose "batch",
then `client.batches.create`; results and per-request errors come back as output/error
files. Anthropic: `client.messages.batches.create` takes the requests inline; results stream
from `client.messages.batches.results`. Each request's `custom_id` is the prompt's cache key
(64 hex characters: stable, unique per prompt and sample, and inside Anthropic's limit).

A request body is built exactly as the sync teacher builds its first try (same model, token
limit, temperature, label schema, logprobs), and an answer is read back by the sync teacher's
own parser, so a batch answer is the same Completion a sync call would have cached. SDK
retries are off: batch.py retries API calls with its own policy, and never blindly retries a
create (it first looks for the batch on the provider).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from pipeline.llm.completion import Completion
from pipeline.teachers.errors import TeacherCallError, status_error, transport_error, unreadable_error
from pipeline.teachers.keys import public_url, resolve_api_key, scrub
from pipeline.teachers.sdk import SdkClient

# Requests whose result says the batch ended before they ran: submitted again, not failures.
LOST = "lost"


@dataclass
class Status:
    """A batch as the provider reports it now."""

    provider_status: str
    ended: bool  # no request will change any more
    done: int  # answered
    failed: int  # errored (expired and cancelled requests are neither)
    total: int
    output_file_id: str | None = None
    error_file_id: str | None = None
    cancelled: bool = False


@dataclass
class Result:
    """One request's outcome: an answer, an error message, or LOST (expired/cancelled before it ran)."""

    key: str
    completion: Completion | None = None
    error: str | None = None
    lost: bool = False


@dataclass
class Limits:
    max_requests: int
    max_bytes: int


@dataclass
class _SdkBatches:
    """What both providers share: the SDK client, made on first use with the teacher's key."""

    teacher: Any  # the sync teacher: its settings build the bodies, its parser reads the answers
    cfg: Any
    _client: SdkClient | None = field(default=None, repr=False)

    provider: ClassVar[str]
    key_env: ClassVar[str]

    def _sdk(self) -> Any:
        if self._client is None:
            key = resolve_api_key(self.teacher.spec, self.cfg, self.key_env)
            self._client = SdkClient(self.provider, key, self.cfg.base_url, self.cfg.timeout_s)
        return self._client.get()

    @property
    def _key(self) -> str | None:  # scrubbed from error text
        return self._client.api_key if self._client is not None else None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


@dataclass
class OpenAIBatches(_SdkBatches):
    """The OpenAI Batch API (and any server implementing its Files and Batches endpoints)."""

    limits: Limits = field(default_factory=lambda: Limits(50_000, 190 * 1024 * 1024))  # 200 MB, with margin
    uploads_input: bool = True

    provider: ClassVar[str] = "openai"
    key_env: ClassVar[str] = "OPENAI_API_KEY"

    def request(self, key: str, messages: list[dict]) -> dict:
        from pipeline.teachers.openai_compat import REASONING_MODEL, label_format, request_params, schema_format

        t = self.teacher
        logprobs = self.cfg.logprobs and not REASONING_MODEL.match(t.model)
        body = {
            "model": t.model,
            "messages": messages,
            **request_params(t.model, t.max_new_tokens, t.temperature, logprobs),
        }
        if t.labels:
            body["response_format"] = label_format(t.labels, "json_schema")
        elif t.schema:
            body["response_format"] = schema_format(t.schema, "json_schema")
        return {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body}

    def encode(self, requests: list[dict]) -> bytes:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests).encode("utf-8")

    async def upload(self, data: bytes, name: str) -> str | None:
        created = await self._call(self._sdk().files.create(file=(name, data, "application/jsonl"), purpose="batch"))
        return created.id

    async def create(self, input_file_id: str | None, requests: list[dict], submission: str) -> str:
        batch = await self._call(
            self._sdk().batches.create(
                input_file_id=input_file_id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"distill_submission": submission},
            )
        )
        return batch.id

    async def find(self, submission: str, since: float, requests: int) -> str | None:
        """The batch created for `submission`, if the create request reached the provider."""
        page = await self._call(self._sdk().batches.list(limit=100))
        for batch in page.data:
            if (batch.metadata or {}).get("distill_submission") == submission:
                return batch.id
        return None

    async def status(self, batch_id: str) -> Status:
        b = await self._call(self._sdk().batches.retrieve(batch_id))
        counts = b.request_counts
        done, failed, total = (counts.completed, counts.failed, counts.total) if counts else (0, 0, 0)
        return Status(
            b.status,
            b.status in ("completed", "expired", "cancelled", "failed"),
            done,
            failed,
            total,
            b.output_file_id,
            b.error_file_id,
            cancelled=b.status == "cancelled",
        )

    async def results(self, batch_id: str, status: Status) -> list[Result]:
        results = []
        for file_id in (status.output_file_id, status.error_file_id):
            if file_id:
                content = await self._call(self._sdk().files.content(file_id))
                results += [self._result(line) for line in content.text.splitlines() if line.strip()]
        return results

    async def cancel(self, batch_id: str) -> str:
        return (await self._call(self._sdk().batches.cancel(batch_id))).status

    def _result(self, line: str) -> Result:
        row = json.loads(line)
        key, response, error = row["custom_id"], row.get("response") or {}, row.get("error")
        if error and error.get("code") in ("batch_expired", "batch_cancelled"):
            return Result(key, lost=True)
        if error or response.get("status_code") != 200:
            message = (error or {}).get("message") or _body_error(response.get("body"))
            return Result(key, error=f"batch request failed (HTTP {response.get('status_code')}): {message}")
        from openai.types.chat import ChatCompletion

        # The sync teacher's own parser: the same Completion (label unwrapped, logprobs) a sync call caches.
        return Result(key, completion=self.teacher._to_completion(ChatCompletion.model_validate(response["body"]), 0))

    async def _call(self, awaitable):
        import openai

        from pipeline.teachers.openai_compat import translate_error

        try:
            return await awaitable
        except openai.OpenAIError as err:
            raise translate_error(err, self._key, self.teacher.spec) from None


@dataclass
class AnthropicBatches(_SdkBatches):
    """Anthropic's Message Batches: requests inline, results streamed as JSONL."""

    limits: Limits = field(default_factory=lambda: Limits(100_000, 240 * 1024 * 1024))  # 256 MB, with margin
    uploads_input: bool = False

    provider: ClassVar[str] = "anthropic"
    key_env: ClassVar[str] = "ANTHROPIC_API_KEY"

    def request(self, key: str, messages: list[dict]) -> dict:
        from pipeline.teachers.anthropic import split_system

        t = self.teacher
        system, turns = split_system(messages)
        params = {
            "model": t.model,
            "max_tokens": t.max_new_tokens,
            "messages": turns,
            "temperature": t.temperature,
            **({"system": system} if system else {}),
        }
        return {"custom_id": key, "params": params}

    def encode(self, requests: list[dict]) -> bytes:
        return json.dumps({"requests": requests}, ensure_ascii=False).encode("utf-8")

    async def upload(self, data: bytes, name: str) -> str | None:
        return None  # the requests travel in the create call

    async def create(self, input_file_id: str | None, requests: list[dict], submission: str) -> str:
        batch = await self._call(self._sdk().messages.batches.create(requests=requests))
        return batch.id

    async def find(self, submission: str, since: float, requests: int) -> str | None:
        """Message Batches carry no metadata: the one batch created since `since` with exactly
        this many requests is ours; none, or more than one, is not proof."""
        page = await self._call(self._sdk().messages.batches.list(limit=100))
        matches = [
            b.id for b in page.data if _timestamp(b.created_at) >= since - 5 and _total(b.request_counts) == requests
        ]
        return matches[0] if len(matches) == 1 else None

    async def status(self, batch_id: str) -> Status:
        b = await self._call(self._sdk().messages.batches.retrieve(batch_id))
        c = b.request_counts
        return Status(
            b.processing_status,
            b.processing_status == "ended",
            c.succeeded,
            c.errored,
            _total(c),
            cancelled=b.cancel_initiated_at is not None,
        )

    async def results(self, batch_id: str, status: Status) -> list[Result]:
        stream = await self._call(self._sdk().messages.batches.results(batch_id))
        return [self._result(row) async for row in stream]

    async def cancel(self, batch_id: str) -> str:
        return (await self._call(self._sdk().messages.batches.cancel(batch_id))).processing_status

    def _result(self, row) -> Result:
        result = row.result
        if result.type == "succeeded":
            return Result(row.custom_id, completion=self.teacher._to_completion(result.message, 0))
        if result.type == "errored":
            return Result(row.custom_id, error=f"batch request failed: {result.error.error.message}")
        return Result(row.custom_id, lost=True)  # expired or canceled before it ran

    async def _call(self, awaitable):
        import anthropic

        try:
            return await awaitable
        except anthropic.APIConnectionError as err:
            raise transport_error(
                err, isinstance(err, anthropic.APITimeoutError), public_url(str(err.request.url))
            ) from None
        except anthropic.APIStatusError as err:
            raise status_error(
                err.status_code, err.response.headers, scrub(str(err.message), self._key), self.teacher.spec
            ) from None
        except anthropic.AnthropicError as err:
            raise TeacherCallError(scrub(f"{type(err).__name__}: {err}", self._key)) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise unreadable_error(type(err).__name__) from None


def batches_for(teacher, cfg) -> OpenAIBatches | AnthropicBatches:
    provider = teacher.spec.partition(":")[0]
    if provider == "openai":
        return OpenAIBatches(teacher, cfg)
    return AnthropicBatches(teacher, cfg)


def _body_error(body) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return "no error message"


def _total(counts) -> int:
    return counts.succeeded + counts.errored + counts.canceled + counts.expired + counts.processing


def _timestamp(value) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)
