"""What stands in front of every route: bearer auth, the body-size limit, and the error handlers
that keep every failure in the OpenAI error envelope."""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.router.errors import AuthenticationFailed, RouterError, error_envelope
from pipeline.router.metrics import RouterMetrics

def bearer_auth(api_keys: tuple[SecretStr, ...]):
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


def limit_body(app: FastAPI, max_bytes: int) -> None:
    app.add_middleware(BodyLimit, max_bytes=max_bytes)


class BodyLimit:
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


def add_error_handlers(app: FastAPI, metrics: RouterMetrics) -> None:
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
