"""Teachers: one interface over every source of labels.

Spec strings pick one:
  local:<model-ref>     a transformers model in-process, batched (no cost, no network)
  openai:<model>        any OpenAI-compatible chat-completions API (openai_compat.py)
  anthropic:<model>     Anthropic's Messages API (anthropic.py)
  logs:<path>           answers the user already has (logs.py); no calls at all

Every teacher has `identity()` (what changes the answer: the cache key) and
`async complete_batch(conversations)`. Remote teachers also have `async complete(messages)`,
one call that raises `TeacherCallError` / `TeacherAuthError`; `dispatch.py` drives those with
concurrency, rate limits, retries and the budget.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol
from urllib.parse import urlparse

from pipeline.errors import DistillError

log = logging.getLogger(__name__)

PROVIDERS = ("local", "openai", "anthropic", "logs")
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@dataclass
class Completion:
    text: str
    usage: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0
    latency_ms: int = 0
    logprobs: float | None = None  # mean token log-probability when the teacher gives one
    finish_reason: str = "stop"
    error: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
    """401/403: no retry can fix a bad key, so the whole capture stops at once."""


class Teacher(Protocol):
    spec: str

    def identity(self) -> dict[str, Any]:
        """Provider, model and generation params: everything that changes the answer (the cache key).
        Never the API key."""

    async def complete_batch(self, conversations: list[list[dict]]) -> list[Completion]: ...


def parse_spec(spec: str) -> tuple[str, str]:
    provider, sep, ref = spec.partition(":")
    if not sep or not ref:
        raise DistillError(f"teacher spec '{spec}' must look like provider:model, e.g. openai:gpt-4o-mini")
    if provider not in PROVIDERS:
        raise DistillError(f"teacher provider '{provider}' is not available; known: {', '.join(PROVIDERS)}")
    return provider, ref


def build_teacher(spec: str, cfg, labels: list[str] | None = None) -> Teacher:
    """Turn a spec string and our TeacherConfig into a teacher. Nothing is loaded or connected
    until first use. `logs:` is not a teacher (it makes no calls): capture imports it directly."""
    provider, ref = parse_spec(spec)
    if provider == "local":
        from pipeline.teachers.local import LocalTeacher

        constrain = labels if cfg.constrain_to_labels else None
        return LocalTeacher(ref, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, labels=constrain)
    if provider == "openai":
        from pipeline.teachers.openai_compat import OpenAITeacher

        return OpenAITeacher(ref, cfg, api_key=resolve_api_key(provider, cfg))
    if provider == "anthropic":
        from pipeline.teachers.anthropic import AnthropicTeacher

        return AnthropicTeacher(ref, cfg, api_key=resolve_api_key(provider, cfg))
    raise DistillError(f"teacher spec '{spec}' imports answers; it has no calls to make")


def resolve_api_key(provider: str, cfg) -> str:
    """The key from the env var the recipe names. A loopback server (llama.cpp, Ollama, vLLM on
    this machine) usually wants none, so a placeholder goes there instead of an error."""
    env = cfg.api_key_env or DEFAULT_KEY_ENV[provider]
    key = os.environ.get(env)
    if key:
        return key
    if cfg.base_url and is_loopback(cfg.base_url):
        log.info("teacher %s: $%s is not set; sending no key to the loopback server", provider, env)
        return "no-key"
    raise DistillError(
        f"teacher {provider}: no API key in ${env}; export it, or name another variable with teacher.api_key_env"
    )


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_url(url: str | None) -> str | None:
    """A base URL fit for records and MLflow: no user:password@, no query (some gateways put keys there)."""
    if not url:
        return url
    parts = urlparse(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


def scrub(text: str, secret: str | None) -> str:
    """Error text from a server can echo the key (OpenAI's 401 quotes part of it): drop the key
    itself and anything shaped like one before the text reaches a record or a log."""
    from pipeline.tracking import redact

    if secret and secret != "no-key":
        text = text.replace(secret, "***")
    return redact({"error": text})["error"]


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
