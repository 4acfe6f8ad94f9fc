"""What the router's HTTP layer is told: limits, mode, the bearer keys (read once, never logged)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from pipeline.config import ServeConfig
from pipeline.errors import DistillError
from pipeline.net import is_loopback_host
from pipeline.router.modes import Mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    api_keys: tuple[SecretStr, ...] = ()  # empty: no auth on /v1 (loopback only); the admin API is then closed
    max_tokens: int = 256  # default and ceiling for completion tokens per request
    mode: Mode = field(default_factory=lambda: Mode("live"))
    max_queue: int = 64  # requests admitted at once; the next gets 429
    deadline_s: float = 30.0  # per request, from admission to the chosen answer
    retry_after_s: int = 1  # sent with a 429
    rollback_window: int = 200  # shadowed pairs averaged before rolling back to off
    max_body_bytes: int = 1 << 20  # a chat request past 1 MiB is not a support message: refused with 413
    max_messages: int = 64
    max_prompt_tokens: int = 2048  # in the student's tokens; longer: 400 before queueing
    body_timeout_s: float = 30.0  # the whole body must arrive within this after the headers: else 408
    header_timeout_s: float = 10.0  # a connection's request head must arrive within this (http_server.py)
    keep_alive_s: int = 5
    max_connections: int = 512  # uvicorn's limit_concurrency
    protect_ops: bool = False  # /metrics and /ready behind the bearer key too
    docs: bool = False  # /docs and /openapi.json

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> ServeSettings:
        return cls(
            api_keys=read_api_keys(cfg.api_key_env, cfg.api_keys_file),
            max_tokens=cfg.max_tokens,
            mode=Mode.parse(cfg.mode),
            max_queue=cfg.max_queue,
            deadline_s=cfg.deadline_s,
            rollback_window=cfg.rollback_window,
            max_prompt_tokens=cfg.max_prompt_tokens,
            body_timeout_s=cfg.body_timeout_s,
            header_timeout_s=cfg.header_timeout_s,
            keep_alive_s=cfg.keep_alive_s,
            max_connections=cfg.max_connections,
            protect_ops=cfg.protect_ops,
            docs=cfg.docs,
        )


def read_api_keys(api_key_env: str | None, api_keys_file: Path | None = None) -> tuple[SecretStr, ...]:
    """The bearer keys clients may send: the env var's comma-separated list and/or the file's
    lines (blank lines and `#` comments skipped). Read once, at startup; never logged. A source
    that was named but holds no key is an error: serving unauthenticated is never the fallback."""
    keys: list[str] = []
    if api_key_env is not None:
        found = _split_keys(os.environ.get(api_key_env, "").split(","))
        if not found:
            raise DistillError(
                f"environment variable {api_key_env} is empty or unset; export the API key there "
                "(several: comma-separated)"
            )
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


def settings_for(cfg: ServeConfig) -> ServeSettings:
    """The settings `serve` runs with. Binding beyond loopback without a key is refused: anyone who
    can reach the port could spend the teacher budget and write the next round's training data."""
    settings = ServeSettings.from_config(cfg)
    if not settings.api_keys and not is_loopback_host(cfg.host):
        raise DistillError(
            f"serve.host={cfg.host} is reachable from other machines and no API key is set; set "
            "serve.api_key_env or serve.api_keys_file, or bind serve.host=127.0.0.1"
        )
    if not settings.api_keys:
        log.info(
            "no API key set: /v1 is open to this machine only and the admin API is closed (SIGHUP reloads the policy)"
        )
    return settings
