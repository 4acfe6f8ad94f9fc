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


def settings_for(cfg: ServeConfig) -> ServeSettings:
    """The settings `serve` runs with; warns when a non-loopback bind has no key."""
    settings = ServeSettings.from_config(cfg)
    if not settings.api_keys and not is_loopback_host(cfg.host):
        log.warning("serving on %s without an API key; set serve.api_key_env or serve.api_keys_file to require one",
                    cfg.host)
    return settings
