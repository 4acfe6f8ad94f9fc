"""What stands in front of every route: bearer auth, the body limit and its deadline, and the
error handlers that keep every failure in the OpenAI error envelope (the unexpected ones too)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.router.errors import AuthenticationFailed, RouterError, error_envelope
from pipeline.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

NO_ADMIN_KEY = (
    "the admin API needs an API key and this server has none; set serve.api_key_env or "
    "serve.api_keys_file (or reload the policy with SIGHUP)"
)


def bearer_auth(api_keys: tuple[SecretStr, ...], *, required: bool = False):
    """A dependency that checks `Authorization: Bearer <key>` when keys are configured.
    `required`: with no key configured, refuse everyone (the admin API is never open)."""
    bearer = HTTPBearer(auto_error=False)  # we raise our own 401 in the OpenAI envelope
    expected = [k.get_secret_value().encode() for k in api_keys]

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not expected:
            if required:
                raise AuthenticationFailed(NO_ADMIN_KEY)
            return
        sent = (credentials.credentials if credentials else "").encode()
        # Every key is compared, each in constant time: neither the match nor which key
        # matched shows in the response time.
        if not any([hmac.compare_digest(sent, key) for key in expected]):
            raise AuthenticationFailed()

    return require_key


def limit_body(app: FastAPI, max_bytes: int, timeout_s: float, on_refused: Callable[[str], None]) -> None:
    app.add_middleware(BodyLimit, max_bytes=max_bytes, timeout_s=timeout_s, on_refused=on_refused)


class BodyLimit:
    """Read the whole body before the app sees it, counting the bytes as they arrive: past
    `max_bytes` the request is refused with 413 whatever Content-Length said (a chunked upload
    declares none), and a body not complete within `timeout_s` is refused with 408 (a client
    sending it byte by byte holds nothing for long). Both close the connection. The app then
    reads the buffered body; after it, `receive` is the server's again (the disconnect watch).
    Plain ASGI: Starlette's @app.middleware("http") costs a task group and streams per request."""

    def __init__(self, app, max_bytes: int, timeout_s: float, on_refused: Callable[[str], None]):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.on_refused = on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(
                scope,
                receive,
                send,
                413,
                "body_too_large",
                f"request body of {int(declared)} bytes exceeds this server's limit of {self.max_bytes}",
            )
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # gone before its body was in: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await self._refuse(
                            scope,
                            receive,
                            send,
                            413,
                            "body_too_large",
                            f"request body exceeds this server's limit of {self.max_bytes} bytes",
                        )
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._refuse(
                scope, receive, send, 408, "body_timeout", f"request body not received within {self.timeout_s:g} s"
            )
            return
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, status: int, code: str, message: str) -> None:
        self.on_refused(code)
        response = JSONResponse(
            error_envelope(message, type="invalid_request_error", code=code),
            status_code=status,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


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
        return JSONResponse(
            error_envelope(message, type="invalid_request_error", param=locs[0] or None), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_envelope(str(exc.detail), type="invalid_request_error"),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug or a library failing: the client still gets the envelope (never a plain-text 500)
        # and the count shows on /metrics; the traceback goes to the server log, not the client.
        metrics.errors.labels("internal").inc()
        log.error("unexpected %s on %s %s; answered 500", type(exc).__name__, request.method, request.url.path)
        return JSONResponse(
            error_envelope(
                "The server had an error while processing your request.", type="server_error", code="internal_error"
            ),
            status_code=500,
        )
