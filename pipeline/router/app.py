"""The OpenAI-compatible router: `make serve` / `distill serve RECIPE`.

An app factory in llama-cpp-python's server layout: `create_app(settings, backends, policy,
teacher=..., escalations=...)` builds everything from its arguments (no globals, nothing at
import), so tests serve a tiny model on loopback and the CLI serves the export. Routing
itself (student, policy, teacher, modes, the escalations log) is routing.py; this module is
HTTP: auth, admission (bounded queue -> 429), option checks, headers, SSE, /metrics.
Start-up (loading the student, the teacher, the tiers; serving a registry alias) is wiring.py;
uvicorn's connection deadlines are http_server.py's.

Admission, in order: the body (guards.py: counted bytes -> 413, a deadline -> 408), the
request's types (protocol.py), its options, the prompt's length in the student's own tokens
(serve.max_prompt_tokens -> 400), then a queue slot (serve.max_queue -> 429). Only then is the
student asked, so no request that would be refused ever shares a micro-batch with others.

The admin API (POST /admin/reload-policy) always needs a key: with none configured it is
closed. /metrics and /ready need one with serve.protect_ops; /health never does. FastAPI's
/docs and /openapi.json are off unless serve.docs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pipeline.conversation import request_params, student_messages
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion
from pipeline.llm.policy import Policy
from pipeline.router.backends import (
    Backend,
    TeacherBackend,
    TokenCompletion,
)
from pipeline.router.errors import (
    ClientDisconnected,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
)
from pipeline.router.escalations import EscalationLog
from pipeline.router.follow import Follower
from pipeline.router.guards import add_error_handlers, bearer_auth, limit_body
from pipeline.router.metrics import CONTENT_TYPE_LATEST, RouterMetrics
from pipeline.router.modes import Rollback
from pipeline.router.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    DistillInfo,
    ModelCard,
    ModelList,
    Usage,
    describe_ignored,
)
from pipeline.router.routing import Ask, Routed, Router, Tier
from pipeline.router.settings import ServeSettings

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-distill-route"
SOURCE_HEADER = "x-distill-source"
VERSION_HEADER = "x-distill-model-version"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def create_app(
    settings: ServeSettings,
    backends: dict[str, Backend | Follower],
    policy: Policy,
    *,
    teacher: TeacherBackend | None = None,
    escalations: EscalationLog | None = None,
    reload_policy: Callable[[], Policy] | None = None,
    tiers: tuple[Tier, ...] = (),
) -> FastAPI:
    """Build the app; `backends` maps each public model name to the student that answers it, or
    to a Follower of a registry alias (at most one), whose versions bring their own policies.
    `teacher`: where escalations go (None: escalations get the student's answer, marked
    student-fallback). The app closes the teacher when it shuts down. `reload_policy`: reads
    the policy again (POST /admin/reload-policy, SIGHUP); it raises DistillError to refuse.
    `tiers`: serve.tiers, asked in order between the student and the teacher (build_tiers);
    the app closes their connections when it shuts down."""
    if settings.mode.needs_teacher and teacher is None:
        raise DistillError(
            f"serve.mode={settings.mode} needs a teacher; use serve.mode=live to serve the student alone"
        )
    followers = [b for b in backends.values() if isinstance(b, Follower)]
    if len(followers) > 1:
        raise DistillError("one registry alias per server: /ready reports one set of served versions")
    metrics = RouterMetrics()
    rollback = Rollback(policy.quality_target, settings.rollback_window) if settings.mode.kind == "shadow" else None
    router = Router(policy, settings.mode, metrics, teacher, escalations, rollback, tiers=tiers)

    def reload() -> dict:
        if reload_policy is None:
            raise InvalidRequest("this server was started without a policy file to reload")
        try:
            fresh = reload_policy()
        except DistillError as err:
            metrics.errors.labels("policy_reload").inc()
            log.error("policy reload refused, keeping %s: %s", router.policy_hash, err)
            # The reason names files on this server: it stays in the server's log.
            raise InvalidRequest(
                f"policy reload refused, kept the current one ({router.policy_hash}); the server log says why"
            ) from None
        previous = router.swap_policy(fresh)
        return {"policy": router.policy_hash, "previous": previous}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if teacher is not None:
            teacher.start()
        if reload_policy is not None and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _on_sighup, reload)
        for follower in followers:
            follower.start(on_error=lambda kind: metrics.errors.labels(kind).inc())
        yield
        for follower in followers:
            await asyncio.to_thread(follower.stop)  # a load in progress finishes off the event loop
        await router.drain()
        await router.aclose()
        if teacher is not None:
            await teacher.aclose()

    docs: dict[str, Any] = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="distill router", lifespan=lifespan, **docs)
    app.state.router = router
    add_error_handlers(app, metrics)
    limit_body(
        app,
        settings.max_body_bytes,
        settings.body_timeout_s,
        on_refused=lambda code: metrics.rejected.labels(code).inc(),
    )
    auth = [Depends(bearer_auth(settings.api_keys))]
    ops = auth if settings.protect_ops else []
    created = int(time.time())
    in_flight = [0]  # one event loop: a plain counter is race-free

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": sorted(backends)}

    @app.get("/ready", dependencies=ops)
    async def ready() -> JSONResponse:
        loaded = all(getattr(b, "ready", True) for b in [*backends.values(), *(t.backend for t in router.tiers)])
        # Serving by alias, the champion's policy is the one that moves with the registry.
        policy, digest = router.policy, router.policy_hash
        served = followers[0].served if followers else None  # one read: a swap may land meanwhile
        if served is not None:
            policy, digest = served.champion.policy, served.champion.policy_hash
        body: dict[str, Any] = {
            "status": "ready" if loaded else "loading",
            "mode": str(router.mode),
            "policy": digest,
            "threshold": _threshold_text(policy.threshold),
            "teacher": teacher.spec if teacher else None,
            "rolled_back": bool(rollback and rollback.tripped),
        }
        if served is not None:
            body["versions"] = followers[0].describe(served)
        if router.tiers:
            body["tiers"] = [
                {"name": t.name, "policy": t.policy_hash, "threshold": _threshold_text(t.policy.threshold)}
                for t in router.tiers
            ]
        return JSONResponse(body, status_code=200 if loaded else 503)

    @app.get("/metrics", dependencies=ops)
    async def metrics_endpoint() -> Response:
        metrics.queue.set(in_flight[0])
        if teacher is not None:
            metrics.teacher_usd.set(teacher.spent_usd)
        if escalations is not None:
            metrics.log_failures.labels("escalations").set(escalations.failed)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload-policy", dependencies=[Depends(bearer_auth(settings.api_keys, required=True))])
    async def reload_endpoint() -> dict:
        return reload()

    v1 = APIRouter(prefix="/v1", dependencies=auth)

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created) for name in backends])

    @v1.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        started = time.monotonic()
        if ignored := request.ignored_fields():
            log.info("ignoring unsupported request fields: %s", describe_ignored(ignored))
        backend = backends.get(request.model)
        if backend is None:
            raise ModelNotFound(request.model, sorted(backends))
        max_tokens = _checked_options(request, settings)
        request_id = request_id_for(raw.headers.get("x-request-id"))
        ask = Ask(
            request_id=request_id,
            key=request.user or request_id,
            conversation=request.conversation(),
            max_tokens=max_tokens,
            deadline=started + settings.deadline_s,
            deadline_s=settings.deadline_s,
            request=request_params(request.model_dump()),
        )
        backend, ask = _pick(backend, ask)
        ask = replace(ask, top_logprobs=_checked_logprobs(request, backend))
        ask = router.with_policy(ask)
        assert ask.policy is not None  # with_policy fixed it
        student_view = student_messages(ask.conversation, ask.policy.student_input)
        await _check_prompt_length(backend, student_view, settings.max_prompt_tokens)
        if in_flight[0] >= settings.max_queue:
            metrics.rejected.labels("queue_full").inc()
            raise QueueFull(settings.max_queue, settings.retry_after_s)
        in_flight[0] += 1
        try:
            routed = await _unless_client_leaves(raw, router.route(backend, ask))
        finally:
            in_flight[0] -= 1
        metrics.requests.labels(routed.route, routed.mode.kind).inc()
        metrics.latency.labels("total").observe(time.monotonic() - started)
        text, finish = _apply_stop(routed.answer, request.stop_sequences())
        cut = len(text) if text != routed.answer.text else None  # a stop sequence cut the answer
        logprobs = _choice_logprobs(routed, cut) if ask.top_logprobs is not None else None
        info = DistillInfo(
            route=routed.route,
            confidence=_finite(routed.confidence),
            policy=routed.policy_hash,
            request_id=request_id,
            mode=str(routed.mode),
            reason=routed.reason,
            source=routed.source,
        )
        headers = distill_headers(info, ask.model_version)
        usage = usage_of(routed.answer)
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                sse_stream(request.model, text, finish, info, usage if include_usage else None, logprobs),
                media_type="text/event-stream",
                headers=headers,
            )
        body = ChatCompletionResponse(
            model=request.model,
            usage=usage,
            distill=info,
            choices=[Choice(index=0, message=AssistantMessage(content=text), finish_reason=finish, logprobs=logprobs)],
        )
        return JSONResponse(body.model_dump(), headers=headers)

    app.include_router(v1)
    return app


# ---------------------------------------------------------------- request checks


def _checked_options(request: ChatCompletionRequest, settings: ServeSettings) -> int:
    """Reject what we cannot honour, with the field named, instead of quietly doing something else."""
    if request.n != 1:
        raise InvalidRequest(f"n={request.n} is not supported; only n=1", param="n")
    if not request.has_user_text():
        raise InvalidRequest(
            "messages has no user message with text; this server answers a user's message", param="messages"
        )
    if len(request.messages) > settings.max_messages:
        raise InvalidRequest(
            f"{len(request.messages)} messages; this server takes at most {settings.max_messages}", param="messages"
        )
    if request.temperature not in (None, 0):
        raise InvalidRequest(
            f"temperature={request.temperature}: this server decodes greedily (what was "
            "evaluated); send temperature=0 or omit it",
            param="temperature",
        )
    if request.top_p not in (None, 1):
        raise InvalidRequest(
            f"top_p={request.top_p}: this server decodes greedily; send top_p=1 or omit it", param="top_p"
        )
    if len(request.stop_sequences()) > 4 or any(not s for s in request.stop_sequences()):
        raise InvalidRequest("stop takes up to 4 non-empty strings", param="stop")
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked > settings.max_tokens:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise InvalidRequest(f"{param}={asked} exceeds this server's limit of {settings.max_tokens}", param=param)
    return asked or settings.max_tokens


def _checked_logprobs(request: ChatCompletionRequest, backend: Backend) -> int | None:
    """How many alternatives per token the client wants (None: no logprobs), refused with a 400
    when this student cannot return them: never an answer quietly without what was asked."""
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")
    if not request.logprobs:
        return None
    most = backend.max_top_logprobs
    if most is None:
        raise InvalidRequest("this model's backend returns no token logprobs; omit logprobs", param="logprobs")
    top = request.top_logprobs or 0
    if top > most:
        raise InvalidRequest(f"top_logprobs={top}: this model's backend returns at most {most}", param="top_logprobs")
    return top


async def _check_prompt_length(backend: Backend, messages: list[dict[str, str]], most: int) -> None:
    """Refuse a prompt longer than serve.max_prompt_tokens, measured in the student's own tokens
    (its chat template included), before it is queued: its memory is bounded by the setting."""
    measure = getattr(backend, "prompt_tokens", None)  # a minimal Backend (tests, benches) measures nothing
    tokens = await measure(messages) if measure is not None else None
    if tokens is not None and tokens > most:
        raise InvalidRequest(
            f"the prompt is {tokens} tokens; this server takes at most {most} (serve.max_prompt_tokens)",
            param="messages",
            code="context_length_exceeded",
        )


def _pick(entry: Backend | Follower, ask: Ask) -> tuple[Backend, Ask]:
    """A followed alias picks the version (champion or candidate) per request; its policy goes along."""
    if not isinstance(entry, Follower):
        return entry, ask
    loaded = entry.pick(ask.key)
    return loaded.backend, replace(
        ask, policy=loaded.policy, policy_hash=loaded.policy_hash, model_version=loaded.version
    )


async def _unless_client_leaves(raw: Request, work: Awaitable[Routed]) -> Routed:
    """Route while watching the connection: a client that hangs up has its work cancelled (its
    queued student request dropped, its teacher call never made or aborted), so it frees its
    slot instead of holding it until an answer nobody will read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(raw))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # the client left, or this handler was cancelled (server shutdown)
            await asyncio.gather(task, return_exceptions=True)  # its cleanup (closing connections) runs now
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnect(raw: Request) -> None:
    """Returns when the client disconnects. The body is already read, so the next ASGI message
    is the disconnect (uvicorn sends nothing else before the response)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _on_sighup(reload: Callable[[], dict]) -> None:
    try:
        reload()
    except InvalidRequest:
        return  # already logged with the reason; the current policy stays


def request_id_for(sent: str | None) -> str:
    """The client's x-request-id when it is a sane token (it is echoed in a header), else a new one."""
    if sent and _REQUEST_ID.match(sent):
        return sent
    return f"req-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- responses


def _apply_stop(answer: Completion, stops: list[str]) -> tuple[str, str]:
    """Cut the answer at the first stop sequence (OpenAI semantics: the sequence is not returned)."""
    text = answer.text
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        return text[: min(cuts)], "stop"
    return text, "stop" if answer.finish_reason != "length" else "length"


def _choice_logprobs(routed: Routed, cut: int | None) -> ChoiceLogprobs | None:
    """The student's answer tokens, up to a stop sequence's `cut` (in characters). A teacher's
    answer has none to give (its tokens are another model's, and TeacherService keeps only their
    log-probs): `logprobs` is null there, which `distill.route` explains."""
    if not isinstance(routed.answer, TokenCompletion):
        return None
    kept, offset = [], 0
    for token in routed.answer.tokens:
        if cut is not None and offset >= cut:
            break
        kept.append(token)
        # The answer's text is stripped: leading whitespace of the first token is not in it.
        offset += len(token.token if kept[1:] else token.token.lstrip())
    return ChoiceLogprobs(content=kept)


def usage_of(answer: Completion) -> Usage:
    prompt, completion = answer.prompt_tokens or 0, answer.completion_tokens or 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finite(score: float | None) -> float | None:
    return score if score is not None and math.isfinite(score) else None


def _threshold_text(threshold: float | None) -> str | float | None:
    return "-inf (student only)" if threshold == -math.inf else threshold


def distill_headers(info: DistillInfo, model_version: str | None = None) -> dict[str, str]:
    headers = {
        ROUTE_HEADER: info.route,
        "x-distill-confidence": "none" if info.confidence is None else f"{info.confidence:.4f}",
        "x-distill-policy": info.policy,
        "x-request-id": info.request_id,
    }
    if model_version is not None:
        headers[VERSION_HEADER] = model_version
    if info.source is not None:
        headers[SOURCE_HEADER] = info.source
    return headers


def _pieces(text: str) -> list[str]:
    """Word-sized stream deltas whose concatenation is exactly `text`."""
    return [p for p in re.split(r"(?<=\s)(?=\S)", text) if p]


async def sse_stream(
    model: str, text: str, finish: str, info: DistillInfo, usage: Usage | None, logprobs: ChoiceLogprobs | None = None
) -> AsyncIterator[bytes]:
    """OpenAI chunk shapes: role, content deltas, finish, optional usage chunk, [DONE]. With
    logprobs, the content goes in one delta carrying all its tokens (word pieces would split
    tokens)."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model, "distill": info}

    def event(choices: list[ChunkChoice], **extra) -> bytes:
        return f"data: {ChatCompletionChunk(choices=choices, **base, **extra).model_dump_json()}\n\n".encode()

    yield event([ChunkChoice(delta=Delta(role="assistant", content=""))])
    if logprobs is not None:
        yield event([ChunkChoice(delta=Delta(content=text), logprobs=logprobs)])
    else:
        for piece in _pieces(text):
            yield event([ChunkChoice(delta=Delta(content=piece))])
    yield event([ChunkChoice(delta=Delta(), finish_reason=finish)])
    if usage is not None:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"


# ---------------------------------------------------------------- auth and errors
