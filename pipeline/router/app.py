"""The OpenAI-compatible router: `make serve` / `distill serve RECIPE`.

An app factory in llama-cpp-python's server layout: `create_app(settings, backends, policy,
teacher=..., escalations=...)` builds everything from its arguments (no globals, nothing at
import), so tests serve a tiny model on loopback and the CLI serves the export. Routing
itself (student, policy, teacher, modes, the escalations log) is routing.py; this module is
HTTP: auth, admission (bounded queue -> 429), option checks, headers, SSE, /metrics.
`serve()` is the CLI's entry: it loads the student and runs uvicorn on 127.0.0.1 unless told
otherwise; `serve_alias()` serves a registry alias and follows it (follow.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import ServeConfig
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion
from pipeline.net import is_loopback_host
from pipeline.router.backends import (
    Backend,
    GgufBackend,
    StudentBackend,
    TeacherBackend,
    TokenCompletion,
    UpstreamBackend,
)
from pipeline.router.errors import (
    AuthenticationFailed,
    ClientDisconnected,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    RouterError,
    error_envelope,
)
from pipeline.router.escalations import EscalationLog
from pipeline.router.follow import Follower, Loaded
from pipeline.router.metrics import CONTENT_TYPE_LATEST, RouterMetrics
from pipeline.router.modes import Mode, Rollback
from pipeline.llm.policy import Policy
from pipeline.router.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
    Choice,
    Delta,
    DistillInfo,
    ModelCard,
    ModelList,
    Usage,
)
from pipeline.router.routing import Ask, Routed, Router, Tier

if TYPE_CHECKING:
    from pipeline.config import Recipe
    from pipeline.registry import Registry, ServedVersion
    from pipeline.task import Task

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-distill-route"
VERSION_HEADER = "x-distill-model-version"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(frozen=True)
class ServeSettings:
    api_keys: tuple[SecretStr, ...] = ()  # empty: no auth (fine on loopback, the default bind)
    max_tokens: int = 256  # default and ceiling for completion tokens per request
    mode: Mode = field(default_factory=lambda: Mode("live"))
    max_queue: int = 64  # requests admitted at once; the next gets 429
    deadline_s: float = 30.0  # per request, from admission to the chosen answer
    retry_after_s: int = 1  # sent with a 429
    rollback_window: int = 200  # shadowed pairs averaged before rolling back to off
    max_body_bytes: int = 1 << 20  # a chat request past 1 MiB is not a support message: refused with 413
    max_messages: int = 64

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> ServeSettings:
        return cls(api_keys=read_api_keys(cfg.api_key_env, cfg.api_keys_file), max_tokens=cfg.max_tokens,
                   mode=Mode.parse(cfg.mode), max_queue=cfg.max_queue, deadline_s=cfg.deadline_s,
                   rollback_window=cfg.rollback_window)


def read_api_keys(api_key_env: str | None, api_keys_file: Path | None = None) -> tuple[SecretStr, ...]:
    """The bearer keys clients may send: the env var's comma-separated list and/or the file's
    lines (blank lines and `#` comments skipped). Read once, at startup; never logged. A source
    that was named but holds no key is an error: serving unauthenticated is never the fallback."""
    keys: list[str] = []
    if api_key_env is not None:
        found = _split_keys(os.environ.get(api_key_env, "").split(","))
        if not found:
            raise DistillError(f"environment variable {api_key_env} is empty or unset; export the API key there "
                               "(several: comma-separated)")
        keys += found
    if api_keys_file is not None:
        try:
            lines = Path(api_keys_file).read_text().splitlines()
        except OSError as err:
            raise DistillError(f"serve.api_keys_file {api_keys_file}: cannot read it ({err.strerror})") from None
        found = _split_keys(line for line in lines if not line.lstrip().startswith("#"))
        if not found:
            raise DistillError(f"serve.api_keys_file {api_keys_file} holds no key; write one per line")
        keys += found
    return tuple(SecretStr(k) for k in dict.fromkeys(keys))


def _split_keys(parts) -> list[str]:
    keys = [p.strip() for p in parts]
    return [k for k in keys if k]


def create_app(settings: ServeSettings, backends: dict[str, Backend | Follower], policy: Policy, *,
               teacher: TeacherBackend | None = None, escalations: EscalationLog | None = None,
               reload_policy: Callable[[], Policy] | None = None, tiers: tuple[Tier, ...] = ()) -> FastAPI:
    """Build the app; `backends` maps each public model name to the student that answers it, or
    to a Follower of a registry alias (at most one), whose versions bring their own policies.
    `teacher`: where escalations go (None: escalations get the student's answer, marked
    student-fallback). The app closes the teacher when it shuts down. `reload_policy`: reads
    the policy again (POST /admin/reload-policy, SIGHUP); it raises DistillError to refuse.
    `tiers`: serve.tiers, asked in order between the student and the teacher (build_tiers);
    the app closes their connections when it shuts down."""
    if settings.mode.needs_teacher and teacher is None:
        raise DistillError(f"serve.mode={settings.mode} needs a teacher; use serve.mode=live to serve the student alone")
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
            raise InvalidRequest(f"policy reload refused, kept the current one: {err}") from None
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

    app = FastAPI(title="distill router", lifespan=lifespan)
    app.state.router = router
    _add_error_handlers(app, metrics)
    _limit_body(app, settings.max_body_bytes)
    created = int(time.time())
    in_flight = [0]  # one event loop: a plain counter is race-free

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": sorted(backends)}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        loaded = all(getattr(b, "ready", True) for b in [*backends.values(), *(t.backend for t in router.tiers)])
        # Serving by alias, the champion's policy is the one that moves with the registry.
        policy, digest = router.policy, router.policy_hash
        served = followers[0].served if followers else None  # one read: a swap may land meanwhile
        if served is not None:
            policy, digest = served.champion.policy, served.champion.policy_hash
        body = {"status": "ready" if loaded else "loading", "mode": str(router.mode), "policy": digest,
                "threshold": _threshold_text(policy.threshold), "teacher": teacher.spec if teacher else None,
                "rolled_back": bool(rollback and rollback.tripped)}
        if served is not None:
            body["versions"] = followers[0].describe(served)
        if router.tiers:
            body["tiers"] = [{"name": t.name, "policy": t.policy_hash, "threshold": _threshold_text(t.policy.threshold)}
                             for t in router.tiers]
        return JSONResponse(body, status_code=200 if loaded else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.queue.set(in_flight[0])
        if teacher is not None:
            metrics.teacher_usd.set(teacher.spent_usd)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    auth = [Depends(_bearer_auth(settings.api_keys))]

    @app.post("/admin/reload-policy", dependencies=auth)
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
            log.info("ignoring unsupported request fields: %s", ", ".join(ignored))
        backend = backends.get(request.model)
        if backend is None:
            raise ModelNotFound(request.model, sorted(backends))
        max_tokens = _checked_options(request, settings)
        if in_flight[0] >= settings.max_queue:
            metrics.rejected.labels("queue_full").inc()
            raise QueueFull(settings.max_queue, settings.retry_after_s)
        request_id = _request_id(raw.headers.get("x-request-id"))
        ask = Ask(request_id=request_id, key=request.user or request_id, prompt=request.user_prompt(),
                  messages=[m.as_template_message() for m in request.messages], max_tokens=max_tokens,
                  deadline=started + settings.deadline_s, deadline_s=settings.deadline_s)
        backend, ask = _pick(backend, ask)
        ask = replace(ask, top_logprobs=_checked_logprobs(request, backend))
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
        info = DistillInfo(route=routed.route, confidence=_finite(routed.confidence), policy=routed.policy_hash,
                           request_id=request_id, mode=str(routed.mode), reason=routed.reason)
        headers = _distill_headers(info, ask.model_version)
        usage = _usage(routed.answer)
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(request.model, text, finish, info, usage if include_usage else None,
                                          logprobs), media_type="text/event-stream", headers=headers)
        body = ChatCompletionResponse(
            model=request.model, usage=usage, distill=info,
            choices=[Choice(index=0, message=AssistantMessage(content=text), finish_reason=finish,
                            logprobs=logprobs)])
        return JSONResponse(body.model_dump(), headers=headers)

    app.include_router(v1)
    return app


# ---------------------------------------------------------------- request checks


def _checked_options(request: ChatCompletionRequest, settings: ServeSettings) -> int:
    """Reject what we cannot honour, with the field named, instead of quietly doing something else."""
    if request.n != 1:
        raise InvalidRequest(f"n={request.n} is not supported; only n=1", param="n")
    if len(request.messages) > settings.max_messages:
        raise InvalidRequest(f"{len(request.messages)} messages; this server takes at most {settings.max_messages}",
                             param="messages")
    if request.temperature not in (None, 0):
        raise InvalidRequest(f"temperature={request.temperature}: this server decodes greedily (what was "
                             "evaluated); send temperature=0 or omit it", param="temperature")
    if request.top_p not in (None, 1):
        raise InvalidRequest(f"top_p={request.top_p}: this server decodes greedily; send top_p=1 or omit it",
                             param="top_p")
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
        raise InvalidRequest(f"top_logprobs={top}: this model's backend returns at most {most}",
                             param="top_logprobs")
    return top


def _pick(entry: Backend | Follower, ask: Ask) -> tuple[Backend, Ask]:
    """A followed alias picks the version (champion or candidate) per request; its policy goes along."""
    if not isinstance(entry, Follower):
        return entry, ask
    loaded = entry.pick(ask.key)
    return loaded.backend, replace(ask, policy=loaded.policy, policy_hash=loaded.policy_hash,
                                   model_version=loaded.version)


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


def _request_id(sent: str | None) -> str:
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


def _usage(answer: Completion) -> Usage:
    prompt, completion = answer.prompt_tokens or 0, answer.completion_tokens or 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finite(score: float | None) -> float | None:
    return score if score is not None and math.isfinite(score) else None


def _threshold_text(threshold: float | None) -> str | float | None:
    return "-inf (student only)" if threshold == -math.inf else threshold


def _distill_headers(info: DistillInfo, model_version: str | None = None) -> dict[str, str]:
    headers = {
        ROUTE_HEADER: info.route,
        "x-distill-confidence": "none" if info.confidence is None else f"{info.confidence:.4f}",
        "x-distill-policy": info.policy,
        "x-request-id": info.request_id,
    }
    if model_version is not None:
        headers[VERSION_HEADER] = model_version
    return headers


def _pieces(text: str) -> list[str]:
    """Word-sized stream deltas whose concatenation is exactly `text`."""
    return [p for p in re.split(r"(?<=\s)(?=\S)", text) if p]


async def _sse(model: str, text: str, finish: str, info: DistillInfo, usage: Usage | None,
               logprobs: ChoiceLogprobs | None = None) -> AsyncIterator[bytes]:
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


def _bearer_auth(api_keys: tuple[SecretStr, ...]):
    """A dependency that checks `Authorization: Bearer <key>` when keys are configured."""
    bearer = HTTPBearer(auto_error=False)  # we raise our own 401 in the OpenAI envelope
    expected = [k.get_secret_value().encode() for k in api_keys]

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not expected:
            return
        sent = (credentials.credentials if credentials else "").encode()
        # Every key is compared, each in constant time: neither the match nor which key
        # matched shows in the response time.
        if not any([hmac.compare_digest(sent, key) for key in expected]):
            raise AuthenticationFailed()

    return require_key


def _limit_body(app: FastAPI, max_bytes: int) -> None:
    app.add_middleware(_BodyLimit, max_bytes=max_bytes)


class _BodyLimit:
    """Refuse an oversize body from its Content-Length, before reading it. Plain ASGI: Starlette's
    @app.middleware("http") costs a task group and streams per request, measurable here."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                response = JSONResponse(error_envelope(
                    f"request body of {int(declared)} bytes exceeds this server's limit of {self.max_bytes}",
                    type="invalid_request_error", code="body_too_large"), status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI, metrics: RouterMetrics) -> None:
    """Every error leaves in the OpenAI envelope, so SDK clients raise the right exception."""

    @app.exception_handler(RouterError)
    async def router_error(_: Request, exc: RouterError) -> JSONResponse:
        metrics.errors.labels(exc.code or exc.type).inc()
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers malformed requests with 400, not FastAPI's 422.
        errors = exc.errors()
        locs = [".".join(str(p) for p in e["loc"] if p != "body") for e in errors]
        message = "; ".join(f"{loc or 'body'}: {e['msg']}" for loc, e in zip(locs, errors))
        metrics.errors.labels("invalid_request").inc()
        return JSONResponse(error_envelope(message, type="invalid_request_error", param=locs[0] or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_envelope(str(exc.detail), type="invalid_request_error"),
                            status_code=exc.status_code, headers=exc.headers)


# ---------------------------------------------------------------- the CLI's entry


def check_policy_matches_export(policy_path: Path, export_dir: Path) -> None:
    """Refuse to serve a policy evaluated on another adapter than the one exported: its
    threshold would mean nothing for this model. Tolerant of policies written before they
    carried `adapter_sha256` (logged, not refused)."""
    from pipeline.artifacts import read_manifest

    try:
        expected = json.loads(Path(policy_path).read_text()).get("adapter_sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise DistillError(f"{policy_path}: not a router policy ({type(err).__name__}: {err})") from None
    manifest = read_manifest(Path(export_dir))
    served = manifest.inputs.get("finetune") if manifest is not None else None
    if expected is None or served is None:
        log.warning("cannot check the policy against the export (%s has no adapter_sha256 or %s no finetune "
                    "input hash); rerun `distill evaluate` to record it", policy_path, export_dir)
        return
    if expected != served:
        raise DistillError(
            f"{policy_path} was evaluated on adapter {expected[:12]} but {export_dir} was exported from "
            f"adapter {served[:12]}; rerun `distill evaluate` and `distill export` on the same finetune")


def build_teacher(recipe: Recipe, task: Task, cfg: ServeConfig) -> TeacherBackend | None:
    """The recipe's teacher for escalations, or None when it cannot answer live (`logs:`)."""
    if recipe.teacher.spec.startswith("logs:"):
        log.warning("teacher.spec=%s imports answers and cannot answer live requests: escalations get the "
                    "student's answer (student-fallback)", recipe.teacher.spec)
        return None
    return TeacherBackend(recipe.teacher, task, recipe.capture.cache, budget_usd=cfg.budget_usd)


def load_checked_policy(policy_path: Path, export_dir: Path) -> Policy:
    """The policy at `policy_path`, refused when it was evaluated on another adapter."""
    check_policy_matches_export(policy_path, export_dir)
    return Policy.load(policy_path)


def student_for(model_dir: Path, policy: Policy, cfg: ServeConfig) -> Backend:
    """The student `serve.student` names, answering for the export in `model_dir` (whose policy it is)."""
    if cfg.student == "transformers":
        labels = list(policy.labels or []) if policy.needs_label_scores else None  # label signals score every label
        return StudentBackend(model_dir, score_labels=labels, max_batch=cfg.max_batch,
                              window_s=cfg.batch_window_ms / 1000, decode=policy.decode)
    if policy.needs_label_scores:
        raise DistillError(f"router signal '{policy.signal}' (decode {policy.decode}) scores every label by "
                           f"teacher forcing, which only serve.student=transformers does; serve with it, or "
                           "evaluate with router.signal=mean_logprob router.decode=generate")
    if cfg.student == "llama.cpp":
        return GgufBackend(cfg.student_gguf or export_gguf_file(Path(model_dir).parent))
    from pipeline.config import TeacherConfig

    # The teacher section's machinery (spec, key env, timeout) describes any OpenAI-compatible server.
    return UpstreamBackend(TeacherConfig(spec=cfg.student, base_url=cfg.student_base_url,
                                         api_key_env=cfg.student_api_key_env, timeout_s=cfg.deadline_s))


def export_gguf_file(export_dir: Path) -> Path:
    """The export's GGUF for serve.student=llama.cpp: the only one, else the q8_0 one (near-lossless)."""
    from pipeline.artifacts import EXPORT_GGUF, gguf_name

    found = sorted((export_dir / EXPORT_GGUF).glob("*.gguf"))
    if len(found) == 1:
        return found[0]
    preferred = export_dir / EXPORT_GGUF / gguf_name("q8_0")
    if preferred in found:
        return preferred
    if not found:
        raise DistillError(f"{export_dir / EXPORT_GGUF}: no GGUF to serve with serve.student=llama.cpp; add gguf to "
                           "export.formats and run `make export`, or set serve.student_gguf")
    raise DistillError(f"{export_dir / EXPORT_GGUF} holds {', '.join(f.name for f in found)}; choose one with "
                       "serve.student_gguf")


def build_tiers(cfg: ServeConfig) -> tuple[Tier, ...]:
    """serve.tiers as Tiers, each with its backend and its own policy; a policy that does not load,
    or a backend that cannot be built, is refused naming the tier's setting."""
    tiers = []
    for i, tier in enumerate(cfg.tiers):
        where = f"serve.tiers.{i} ({tier.name})"
        if not Path(tier.policy).is_file():
            raise DistillError(f"{where}.policy: {tier.policy} does not exist; point it at that tier's "
                               "router_policy.json (`distill evaluate` on that model writes one)")
        try:
            if tier.student == "transformers":
                check_policy_matches_export(tier.policy, Path(tier.model_dir).parent)
            policy = Policy.load(tier.policy)
        except DistillError as err:
            raise DistillError(f"{where}.policy: {err}") from None
        if tier.student == "transformers" and not (Path(tier.model_dir) / "config.json").is_file():
            raise DistillError(f"{where}.model_dir: {tier.model_dir} has no config.json, so no model to serve")
        # The tier is a student of its own: serve.student's machinery builds it.
        as_student = cfg.model_copy(update={"student": tier.student, "student_gguf": tier.gguf,
                                            "student_base_url": tier.base_url,
                                            "student_api_key_env": tier.api_key_env})
        try:
            backend = student_for(Path(tier.model_dir or "."), policy, as_student)
        except DistillError as err:
            raise DistillError(f"{where}: {err}") from None
        tiers.append(Tier.of(tier.name, backend, policy, tier.timeout_s))
    return tuple(tiers)


def _settings(cfg: ServeConfig) -> ServeSettings:
    settings = ServeSettings.from_config(cfg)
    if not settings.api_keys and not is_loopback_host(cfg.host):
        log.warning("serving on %s without an API key; set serve.api_key_env or serve.api_keys_file to require one",
                    cfg.host)
    return settings


def _teacher(recipe: Recipe | None, cfg: ServeConfig, needed: bool) -> TeacherBackend | None:
    from pipeline.task import load_task

    if recipe is None or not needed:
        return None
    return build_teacher(recipe, load_task(recipe.capture.task), cfg)


def _escalations(cfg: ServeConfig, teacher: TeacherBackend | None) -> EscalationLog | None:
    return EscalationLog(cfg.escalations) if teacher is not None else None


def serve(model_dir: Path, policy: Policy, cfg: ServeConfig, recipe: Recipe | None = None,
          policy_path: Path | None = None) -> None:
    """Load the student from `model_dir` and serve it until interrupted (`make serve`).
    `recipe`: where the teacher comes from; None serves without one (live mode only).
    `policy_path`: where `policy` came from, read again on SIGHUP or POST /admin/reload-policy."""
    import uvicorn

    model_dir = Path(model_dir)
    if cfg.student == "transformers" and not (model_dir / "config.json").is_file():
        raise DistillError(f"{model_dir}: no config.json, so no exported student to serve; run `make export` first")
    settings = _settings(cfg)  # before the slow load: fail fast
    teacher = _teacher(recipe, cfg, needed=policy.threshold != -math.inf or settings.mode.needs_teacher)
    tiers = build_tiers(cfg)  # before the student: a bad tier fails before the slow load
    student = student_for(model_dir, policy, cfg)
    reload = (lambda: load_checked_policy(policy_path, model_dir.parent)) if policy_path is not None else None
    app = create_app(settings, {cfg.model_name: student}, policy, teacher=teacher,
                     escalations=_escalations(cfg, teacher), reload_policy=reload, tiers=tiers)
    log.info("serving %s (%s) as '%s' on http://%s:%d/v1 (mode %s, policy %s: %s threshold %s, teacher %s)",
             model_dir, cfg.student, cfg.model_name, cfg.host, cfg.port, settings.mode, app.state.router.policy_hash, policy.signal,
             policy.threshold, teacher.spec if teacher else "none")
    if tiers:
        log.info("tiers between the student and the teacher: %s",
                 ", ".join(f"{t.name} ({t.policy.signal} threshold {t.policy.threshold})" for t in tiers))
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


# ---------------------------------------------------------------- serving a registry alias (follow.py)


def load_version(version: ServedVersion, cfg: ServeConfig, signal_name: str = "mean_logprob") -> Loaded:
    """A registry version's student and its run's evaluated policy, checked against its export
    (student-only, with a warning, when the run has none). Raises DistillError or the loader's
    error; the policy is checked before the slow model load."""
    if not (version.source / "config.json").is_file():
        raise DistillError(f"{version.name} version {version.version}: {version.source} has no config.json, so no "
                           "exported student to serve")
    if version.policy_path is None:
        log.warning("%s version %s: no evaluated policy beside %s; serving it student-only, nothing escalates",
                    version.name, version.version, version.source)
        policy = Policy.student_only(signal_name)
    else:
        policy = load_checked_policy(version.policy_path, version.source.parent)
    return Loaded.of(version.version, student_for(version.source, policy, cfg), policy)


def alias_app(registry: Registry, name: str, alias: str, cfg: ServeConfig, recipe: Recipe | None = None) -> FastAPI:
    """The app answering with `name@alias` (and serve.candidate_percent with `name@candidate`),
    following both in `registry` every serve.registry_poll_s."""
    settings = _settings(cfg)  # before the slow load: fail fast
    tiers = build_tiers(cfg)
    signal_name = recipe.router.signal if recipe is not None else "mean_logprob"

    def load(version: ServedVersion) -> Loaded:
        return load_version(version, cfg, signal_name)

    champion = load(registry.require(name, alias))
    follower = Follower(registry, name, alias, champion, load, poll_s=cfg.registry_poll_s,
                        candidate_percent=cfg.candidate_percent)
    # Whatever this version's policy, the next one promoted may escalate: keep the teacher at hand.
    teacher = _teacher(recipe, cfg, needed=True)
    app = create_app(settings, {cfg.model_name: follower}, champion.policy, teacher=teacher,
                     escalations=_escalations(cfg, teacher), tiers=tiers)
    app.state.follower = follower
    return app


def serve_alias(registry: Registry, name: str, alias: str, cfg: ServeConfig, recipe: Recipe | None = None) -> None:
    """Serve `models:/<name>@<alias>` until interrupted, following the alias when it moves."""
    import uvicorn

    app = alias_app(registry, name, alias, cfg, recipe)
    teacher = app.state.router.teacher
    log.info("serving models:/%s@%s as '%s' on http://%s:%d/v1 (mode %s, candidate %g%%, registry %s every %g s, "
             "teacher %s)", name, alias, cfg.model_name, cfg.host, cfg.port, cfg.mode, cfg.candidate_percent,
             registry.uri, cfg.registry_poll_s, teacher.spec if teacher else "none")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
