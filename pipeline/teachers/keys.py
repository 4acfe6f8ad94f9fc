"""API keys for the HTTP teachers: where they come from, and how they stay out of records and logs.

Used by openai_compat.py and anthropic.py when a teacher is built (`distill capture RECIPE`,
the judge, the router's teacher backend). A key lives only in the teacher object that sends
it; identities, reprs, error messages and MLflow params see `public_url` and `scrub` output.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

from pipeline.errors import DistillError
from pipeline.net import is_loopback_url

log = logging.getLogger(__name__)

NO_KEY = "no-key"  # what a loopback server that wants no key is sent


def resolve_api_key(spec: str, cfg, default_env: str) -> str:
    """The key from the env var the recipe names (else `default_env`). A loopback server
    (llama.cpp, Ollama, vLLM on this machine) usually wants none, so a placeholder goes there
    instead of an error."""
    env = cfg.api_key_env or default_env
    key = os.environ.get(env)
    if key:
        return key
    if cfg.base_url and is_loopback_url(cfg.base_url):
        log.info("teacher %s: $%s is not set; sending no key to the loopback server", spec, env)
        return NO_KEY
    raise DistillError(
        f"teacher {spec}: no API key in ${env}; export it, or name another variable with teacher.api_key_env"
    )


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

    if secret and secret != NO_KEY:
        text = text.replace(secret, "***")
    return redact({"error": text})["error"]
