"""The OpenAI-compatible server for the student: `make serve` / `distill serve RECIPE`.

An app factory in llama-cpp-python's server layout: `create_app(settings, backends,
policy)` builds everything from its arguments (no globals, nothing at import), so tests
serve a tiny model on loopback and the CLI serves the export. `serve()` is the CLI's
entry: it loads the student and runs uvicorn on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import ServeConfig
from pipeline.errors import DistillError
from pipeline.net import is_loopback_host
from pipeline.router.backends import Backend, StudentBackend
from pipeline.router.errors import AuthenticationFailed, InvalidRequest, ModelNotFound, RouterError, error_envelope
from pipeline.router.policy import Policy
from pipeline.router.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-distill-route"


@dataclass(frozen=True)
class ServeSettings:
    api_key: SecretStr | None = None  # None: no auth (fine on loopback, the default bind)
    max_tokens: int = 256  # default and ceiling for completion tokens per request

    @classmethod
    def from_env(cls, api_key_env: str | None, **kwargs) -> ServeSettings:
        """Read the bearer key from the named env var, once, at startup; never logged."""
        if api_key_env is None:
            return cls(**kwargs)
        value = os.environ.get(api_key_env, "")
        if not value:
            # Refuse rather than serve unauthenticated when a key was asked for.
            raise DistillError(f"environment variable {api_key_env} is empty or unset; export the API key there")
        return cls(api_key=SecretStr(value), **kwargs)


def create_app(settings: ServeSettings, backends: dict[str, Backend], policy: Policy) -> FastAPI:
    """Build the app; `backends` maps each public model name to what answers it."""
    app = FastAPI(title="distill router")
    _add_error_handlers(app)
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": sorted(backends)}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_bearer_auth(settings.api_key))])

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created) for name in backends])

    @v1.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, response: Response) -> ChatCompletionResponse:
        if ignored := request.ignored_fields():
            log.info("ignoring unsupported request fields: %s", ", ".join(ignored))
        backend = backends.get(request.model)
        if backend is None:
            raise ModelNotFound(request.model, sorted(backends))
        max_tokens = _checked_max_tokens(request, settings)
        completion = await backend.complete([m.as_template_message() for m in request.messages], max_tokens)
        decision = policy.decide(completion)
        if decision.route == "escalate":
            log.info("escalate (%s); no teacher backend yet, answering from the student", decision.reason)
        response.headers[ROUTE_HEADER] = decision.route
        return ChatCompletionResponse(
            model=request.model,
            choices=[Choice(index=0, message=AssistantMessage(content=completion.text),
                            finish_reason=completion.finish_reason)],
            usage=Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                        total_tokens=completion.prompt_tokens + completion.completion_tokens),
        )

    app.include_router(v1)
    return app


def _checked_max_tokens(request: ChatCompletionRequest, settings: ServeSettings) -> int:
    """Reject what we cannot honour, with the field named, instead of quietly doing something else."""
    if request.stream:
        raise InvalidRequest("stream=true is not supported yet; send stream=false", param="stream")
    if request.n != 1:
        raise InvalidRequest(f"n={request.n} is not supported; only n=1", param="n")
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked > settings.max_tokens:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise InvalidRequest(f"{param}={asked} exceeds this server's limit of {settings.max_tokens}", param=param)
    return asked or settings.max_tokens


def _bearer_auth(api_key: SecretStr | None):
    """A dependency that checks `Authorization: Bearer <key>` when a key is configured."""
    bearer = HTTPBearer(auto_error=False)  # we raise our own 401 in the OpenAI envelope

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        sent = credentials.credentials if credentials else ""
        if not secrets.compare_digest(sent.encode(), api_key.get_secret_value().encode()):
            raise AuthenticationFailed()

    return require_key


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the OpenAI envelope, so SDK clients raise the right exception."""

    @app.exception_handler(RouterError)
    async def router_error(_: Request, exc: RouterError) -> JSONResponse:
        return JSONResponse(exc.envelope(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers malformed requests with 400, not FastAPI's 422.
        errors = exc.errors()
        locs = [".".join(str(p) for p in e["loc"] if p != "body") for e in errors]
        message = "; ".join(f"{loc or 'body'}: {e['msg']}" for loc, e in zip(locs, errors))
        return JSONResponse(error_envelope(message, type="invalid_request_error", param=locs[0] or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_envelope(str(exc.detail), type="invalid_request_error"),
                            status_code=exc.status_code, headers=exc.headers)


def serve(model_dir: Path, policy: Policy, cfg: ServeConfig) -> None:
    """Load the student from `model_dir` and serve it until interrupted (`make serve`)."""
    import uvicorn

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DistillError(f"{model_dir}: no config.json, so no exported student to serve; run `make export` first")
    settings = ServeSettings.from_env(cfg.api_key_env, max_tokens=cfg.max_tokens)  # before the slow load: fail fast
    if settings.api_key is None and not is_loopback_host(cfg.host):
        log.warning("serving on %s without an API key; set serve.api_key_env to require one", cfg.host)
    app = create_app(settings, {cfg.model_name: StudentBackend(model_dir)}, policy)
    log.info("serving %s as '%s' on http://%s:%d/v1 (policy: %s threshold %s)", model_dir, cfg.model_name,
             cfg.host, cfg.port, policy.signal, policy.threshold)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
