"""Capture by proxy, before any student exists: `distill serve RECIPE --teacher-only`.

    distill serve RECIPE --teacher-only            # then, in the app: OPENAI_BASE_URL=http://127.0.0.1:8000/v1
    distill capture RECIPE teacher.spec=logs:.distill/proxy.jsonl

An OpenAI-compatible endpoint in front of the app. Each request goes to the recipe's teacher as
the app sent it: every message (system/developer, user and assistant turns, text parts joined)
and the parameters that change the answer (`response_format`, `max_tokens` or
`max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`), through the teacher service
(its cache, price table, ledger and key handling; `serve.budget_usd`, spend kept in
`serve.ledger`). The teacher's answer goes back unchanged (streamed as chunks once complete when
`stream: true`), and the pair is appended to `serve.proxy_log` in the capture record format
(RECORDS.md, meta.source="proxy") through the same log writer as the escalations (record_log.py).

Refused with a 400 naming the field, never forwarded without it: what a capture record cannot
hold (tools, function calls, n > 1, logprobs) and what the teacher's API cannot take (e.g.
`response_format` or `seed` with anthropic:). A request without `max_tokens` is sent with
`serve.max_tokens`, so its worst case can be reserved against the budget; the record says so.
A `model` other than the teacher's model name or `serve.model_name` is a 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pipeline.artifacts import sha256_json
from pipeline.conversation import check_conversation
from pipeline.llm.completion import Completion
from pipeline.router.app import distill_headers, request_id_for, sse_stream, usage_of
from pipeline.router.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    RouterError,
)
from pipeline.router.guards import add_error_handlers, bearer_auth, limit_body
from pipeline.router.metrics import CONTENT_TYPE_LATEST, RouterMetrics
from pipeline.router.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    DistillInfo,
    ModelCard,
    ModelList,
    describe_ignored,
)
from pipeline.router.record_log import RecordLog
from pipeline.router.settings import ServeSettings
from pipeline.teachers.dispatch import BUDGET_RETRY
from pipeline.teachers.errors import TeacherFatalError
from pipeline.teachers.service import NOT_SENT

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.config import TeacherConfig
    from pipeline.teachers.service import TeacherService

log = logging.getLogger(__name__)

# Declared request fields forwarded when the client sent them; `response_format` rides in the extras.
FORWARDED = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed")
# What a capture record cannot hold: refused rather than forwarded without it (the answer would differ).
NOT_RECORDABLE = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "audio",
    "modalities",
    "prediction",
    "n",
    "logprobs",
    "top_logprobs",
)


class ProxyTeacher:
    """The recipe's teacher as the proxy asks it: the client's conversation and parameters, through
    a TeacherService built on the server's event loop (its SQLite cache belongs to that thread)."""

    def __init__(
        self,
        cfg: TeacherConfig,
        cache_path: Path | str,
        budget_usd: float | None = None,
        ledger_path: Path | None = None,
    ):
        # The client's own response_format decides the answer's shape: no label constraint.
        update = {"constrain_to_labels": False, **({"budget_usd": budget_usd} if budget_usd is not None else {})}
        self.cfg = cfg.model_copy(update=update)
        self.cache_path = cache_path
        self.ledger_path = ledger_path
        self.service: TeacherService | None = None

    @property
    def spec(self) -> str:
        return self.cfg.spec

    @property
    def model(self) -> str:
        return self.cfg.spec.partition(":")[2]

    @property
    def spent_usd(self) -> float:
        ledger = self.service.ledger if self.service is not None else None
        return ledger.total_usd if ledger is not None else 0.0

    def start(self) -> None:
        from pipeline.teachers.service import TeacherService

        if self.service is None:
            self.service = TeacherService.from_config(
                self.cfg, cache_path=self.cache_path, ledger_path=self.ledger_path, charge_cached=False
            )

    def forwards(self) -> frozenset[str]:
        self.start()
        assert self.service is not None  # start() made it
        return self.service.teacher.forwards

    async def answer(self, messages: list[dict[str, str]], params: dict, timeout_s: float) -> Completion:
        """The teacher's answer (cached or bought), or a Completion with `error` set; DeadlineExceeded
        past `timeout_s` (the call, if out, finishes in the background and is cached)."""
        self.start()
        assert self.service is not None  # start() made it
        try:
            async with asyncio.timeout(max(timeout_s, 0.001)):
                (completion,) = await self.service.answer([messages], params=params)
        except TimeoutError:
            raise DeadlineExceeded(f"the teacher did not answer within serve.deadline_s ({timeout_s:g} s)") from None
        except TeacherFatalError as err:
            log.error("teacher %s refused: %s", self.spec, err)
            raise BackendUnavailable(f"the teacher {self.spec} refused the call ({type(err).__name__})") from None
        return completion

    async def aclose(self) -> None:
        if self.service is not None:
            await self.service.aclose()


class BudgetExhausted(RouterError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exhausted"


def create_proxy_app(
    settings: ServeSettings, teacher: ProxyTeacher, capture: RecordLog, model_names: tuple[str, ...] = ()
) -> FastAPI:
    """The teacher-only proxy. `model_names`: what clients may send as `model` besides the
    teacher's own model name (serve.model_name)."""
    metrics = RouterMetrics()
    served = tuple(dict.fromkeys((teacher.model, *model_names)))
    created = int(time.time())
    in_flight = [0]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        teacher.start()
        yield
        await teacher.aclose()

    docs: dict[str, Any] = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="distill proxy", lifespan=lifespan, **docs)
    add_error_handlers(app, metrics)
    limit_body(
        app,
        settings.max_body_bytes,
        settings.body_timeout_s,
        on_refused=lambda code: metrics.rejected.labels(code).inc(),
    )
    auth = [Depends(bearer_auth(settings.api_keys))]
    ops = auth if settings.protect_ops else []

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(served)}

    @app.get("/ready", dependencies=ops)
    async def ready() -> dict:
        return {"status": "ready", "mode": "proxy", "teacher": teacher.spec}

    @app.get("/metrics", dependencies=ops)
    async def metrics_endpoint() -> Response:
        metrics.queue.set(in_flight[0])
        metrics.teacher_usd.set(teacher.spent_usd)
        metrics.log_failures.labels("proxy").set(capture.failed)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=auth)

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created) for name in served])

    @v1.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        started = time.monotonic()
        if request.model not in served:
            raise ModelNotFound(request.model, list(served))
        params = _forwarded(request, teacher.forwards(), settings.max_tokens)
        if ignored := [n for n in request.ignored_fields() if n != "response_format"]:
            log.info("not forwarded (no effect on the answer): %s", describe_ignored(ignored))
        if in_flight[0] >= settings.max_queue:
            metrics.rejected.labels("queue_full").inc()
            raise QueueFull(settings.max_queue, settings.retry_after_s)
        request_id = request_id_for(raw.headers.get("x-request-id"))
        conversation = request.conversation()
        in_flight[0] += 1
        try:
            answer = await teacher.answer(conversation, params, settings.deadline_s)
        finally:
            in_flight[0] -= 1
        if answer.error is not None:
            log.warning("request %s: teacher failed (%s)", request_id, answer.error)
            metrics.errors.labels("teacher").inc()
            if answer.error in (NOT_SENT, BUDGET_RETRY):
                raise BudgetExhausted("serve.budget_usd is spent: the proxy sends nothing more to the teacher")
            raise BackendUnavailable(f"the teacher {teacher.spec} failed: {answer.error}")
        metrics.requests.labels("teacher", "proxy").inc()
        metrics.latency.labels("teacher").observe(answer.latency_ms / 1000)
        metrics.latency.labels("total").observe(time.monotonic() - started)
        for kind, n in answer.usage.items():
            metrics.tokens.labels("teacher", kind.removesuffix("_tokens")).inc(n)
        _record(capture, metrics, request_id, conversation, params, answer, teacher.spec)
        info = DistillInfo(
            route="teacher",
            confidence=None,
            policy="",
            request_id=request_id,
            mode="proxy",
            reason="teacher-only proxy",
        )
        finish = "length" if answer.finish_reason == "length" else "stop"
        usage = usage_of(answer)
        headers = distill_headers(info)
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                sse_stream(request.model, answer.text, finish, info, usage if include_usage else None),
                media_type="text/event-stream",
                headers=headers,
            )
        body = ChatCompletionResponse(
            model=request.model,
            usage=usage,
            distill=info,
            choices=[Choice(index=0, message=AssistantMessage(content=answer.text), finish_reason=finish)],
        )
        return JSONResponse(body.model_dump(), headers=headers)

    app.include_router(v1)
    return app


def _forwarded(request: ChatCompletionRequest, forwards: frozenset[str], default_max_tokens: int) -> dict:
    """The request's answer-changing parameters as sent; a 400 naming what cannot be forwarded."""
    sent = request.model_fields_set | set(request.model_extra or {})
    for name in NOT_RECORDABLE:
        declared = name in ("n", "logprobs", "top_logprobs")
        value = getattr(request, name) if declared else (request.model_extra or {}).get(name)
        defaults: dict[str, list[object]] = {"n": [1], "logprobs": [False], "top_logprobs": [0]}
        harmless = defaults.get(name, [[], {}])
        if name in sent and value is not None and value not in harmless:
            raise InvalidRequest(
                f"{name} is not supported by the capture proxy: its records hold text conversations and one answer",
                param=name,
            )
    params = {name: getattr(request, name) for name in FORWARDED if name in sent and getattr(request, name) is not None}
    response_format = (request.model_extra or {}).get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise InvalidRequest("response_format must be an object", param="response_format")
        params["response_format"] = response_format
    if "max_tokens" not in params and "max_completion_tokens" not in params:
        params["max_tokens"] = default_max_tokens  # bounded, so the budget can reserve its worst case
    for name in params:
        if name not in forwards:
            raise InvalidRequest(f"{name} cannot be forwarded to this teacher's API; drop it", param=name)
    return params


def _recordable(conversation: list[dict[str, str]]) -> bool:
    try:
        check_conversation(conversation)
    except ValueError:
        return False
    return bool(conversation[-1]["content"].strip())


def _record(
    capture: RecordLog,
    metrics: RouterMetrics,
    request_id: str,
    conversation: list[dict[str, str]],
    params: dict,
    answer: Completion,
    spec: str,
) -> None:
    """The pair in the capture record format; one `logs:` would reject or could not learn from (not
    ending in a user turn with text, an empty answer) is answered but not recorded, and counted."""
    if not _recordable(conversation) or not answer.text.strip():
        metrics.errors.labels("not_recorded").inc()
        return
    record = {
        "id": request_id,
        "messages": [*conversation, {"role": "assistant", "content": answer.text}],
        "meta": {
            "source": "proxy",
            "teacher": spec,
            "request": params,
            "prompt_sha": sha256_json(conversation)[:16],
            "cost_usd": answer.cost_usd,
            "latency_ms": answer.latency_ms,
            "usage": answer.usage,
            "token_logprobs": answer.token_logprobs,
            "finish_reason": answer.finish_reason,
            "created_at": answer.created_at,
        },
    }
    capture.append(record)
