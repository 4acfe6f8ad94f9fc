"""What a failed teacher call becomes, shared by the HTTP teachers (openai_compat.py, anthropic.py).

Used wherever a teacher is asked (`distill capture RECIPE`, the judge, the router's teacher
backend). Each SDK's exceptions are mapped to these by class and HTTP status in the provider
module, never by message text; the status rules themselves live here so both providers agree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.errors import DistillError


class TeacherCallError(Exception):
    """One call failed. `retryable` (429, 5xx, timeout, unreadable response) decides whether
    the dispatcher tries again; `retry_after` is the server's Retry-After in seconds.

    `billable`: the request reached the server and we do not know what it did (timed out
    waiting, body cut off, connection reset after sending). A provider bills a generation
    that finished on its side whether or not we read it, so the ledger charges the attempt
    its reserved worst case. An error status (429, 500) or a connection never made is not billed.
    `unreachable`: no connection could be made at all (refused, DNS, connect timeout); the
    dispatcher's circuit breaker counts these."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        billable: bool = False,
        unreachable: bool = False,
    ):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.billable = billable
        self.unreachable = unreachable


class TeacherFatalError(DistillError):
    """No other prompt can succeed after this: everything asking stops at once."""


class TeacherAuthError(TeacherFatalError):
    """401/403: no retry can fix a bad key, so everything asking stops at once."""


class TeacherUnreachableError(TeacherFatalError):
    """The circuit breaker opened: consecutive calls could not even connect."""


def status_error(status: int, headers, message: str, spec: str) -> Exception:
    """An HTTP error status -> TeacherAuthError or a (maybe retryable) TeacherCallError.
    `message` must already be scrubbed of the key (keys.scrub)."""
    if status in (401, 403):
        # The server's text may quote part of the key; the status says enough.
        return TeacherAuthError(
            f"teacher {spec} refused the API key (HTTP {status}); check the env var named by "
            "teacher.api_key_env and its permissions. Nothing was retried."
        )
    retryable = status in (408, 409, 429) or status >= 500
    return TeacherCallError(
        f"HTTP {status}: {message[:300]}", status=status, retryable=retryable, retry_after=parse_retry_after(headers)
    )


def parse_retry_after(headers) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass  # malformed header: fall through to Retry-After
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def transport_error(err: BaseException, timed_out: bool, url: str | None) -> TeacherCallError:
    """An SDK's timeout / connection error -> ours, by the httpx exception underneath (both
    SDKs chain it as __cause__). A connection never made costs nothing and feeds the circuit
    breaker; anything after the request went out may have been generated, so it is billable.
    `url` must already be public (keys.public_url: no credentials)."""
    cause = err.__cause__
    name = type(cause).__name__ if cause is not None else type(err).__name__
    if _is_a(cause, "ConnectError", "ConnectTimeout"):
        return TeacherCallError(f"could not connect to {url} ({name})", retryable=True, unreachable=True)
    if _is_a(cause, "PoolTimeout"):  # waited for a free connection: nothing was sent
        return TeacherCallError("timed out waiting for a connection", retryable=True)
    what = "timed out" if timed_out else f"connection failed ({name})"
    return TeacherCallError(f"{what} after the request was sent", retryable=True, billable=True)


def unreadable_error(what: str) -> TeacherCallError:
    """A 200 whose body we could not use (cut off mid-JSON, wrong shape): the server generated
    it, so it is billed like any answer, and worth another try."""
    return TeacherCallError(f"unreadable response: {what}", retryable=True, billable=True)


def _is_a(exc: BaseException | None, *class_names: str) -> bool:
    """By class name along the MRO, not isinstance: the SDKs ride on httpx or its successor
    httpx2 (openai>=3), whose transport exceptions share names but not classes."""
    return exc is not None and any(k.__name__ in class_names for k in type(exc).__mro__)
