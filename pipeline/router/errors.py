"""Typed router errors, each rendered as the OpenAI error envelope.

Clients built on the OpenAI SDK branch on status and `error.code`, so these match what
api.openai.com sends: {"error": {"message", "type", "param", "code"}}. FastAPI-free.
"""

from __future__ import annotations


class RouterError(Exception):
    """An error a client caused or must handle; the message is safe to send back."""

    status = 500
    type = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None  # extra response headers (Retry-After on a 429)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def envelope(self) -> dict:
        return error_envelope(self.message, type=self.type, param=self.param, code=self.code)


class InvalidRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(RouterError):
    """Unknown `model`: a 404, never a silent fallback to another model."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, known: list[str]):
        super().__init__(f"The model '{model}' does not exist; served models: {', '.join(known)}", param="model")


class AuthenticationFailed(RouterError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "Missing or incorrect API key; send 'Authorization: Bearer <key>'."):
        super().__init__(message)


class QueueFull(RouterError):
    """More requests in flight than `serve.max_queue`: the client should back off and retry."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, max_queue: int, retry_after_s: int):
        super().__init__(f"The router already has {max_queue} requests in flight; retry after {retry_after_s} s.")
        self.headers = {"Retry-After": str(retry_after_s)}


class ClientDisconnected(RouterError):
    """The client hung up before its answer was chosen; the work was cancelled. Nobody reads the
    response: the status (nginx's 499) is for the log and `distill_errors{kind="client_disconnected"}`."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the answer was ready")


class DeadlineExceeded(RouterError):
    """Not even the student answered within `serve.deadline_s`."""

    status = 504
    type = "server_error"
    code = "deadline_exceeded"


class BackendUnavailable(RouterError):
    """Neither the student nor the teacher could answer."""

    status = 503
    type = "server_error"
    code = "backend_unavailable"


def error_envelope(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
