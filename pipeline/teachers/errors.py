"""What a failed teacher call becomes, shared by the HTTP teachers (openai_compat.py, anthropic.py).

Used wherever a teacher is asked (`distill capture RECIPE`, the judge, the router's teacher
backend). Each SDK's exceptions are mapped to these by class and HTTP status in the provider
module, never by message text; the status rules themselves live here so both providers agree.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pipeline.errors import DistillError


class TeacherCallError(Exception):
    """One call failed. `retryable` (429, 5xx, timeout, unreadable response) decides whether
    the dispatcher tries again; `retry_after` is the server's Retry-After in seconds."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class TeacherAuthError(DistillError):
    """401/403: no retry can fix a bad key, so everything asking stops at once."""


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
        return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)
