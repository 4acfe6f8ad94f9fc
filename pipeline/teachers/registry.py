"""Provider name -> teacher class, and spec strings -> teachers.

    distill capture RECIPE teacher.spec=openai:gpt-4o-mini

A new provider is one class implementing `Teacher` (protocol.py) and one line in TEACHERS.
`logs:` is in PROVIDERS but not in TEACHERS: it imports answers the user already has and makes
no calls, so capture reads it with logs.py instead of asking a teacher.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DistillError
from pipeline.teachers.anthropic import AnthropicTeacher
from pipeline.teachers.local import LocalTeacher
from pipeline.teachers.openai_compat import OpenAITeacher
from pipeline.teachers.protocol import Teacher

TEACHERS: dict[str, type[Teacher]] = {
    "local": LocalTeacher,
    "openai": OpenAITeacher,
    "anthropic": AnthropicTeacher,
}
PROVIDERS = (*TEACHERS, "logs")


def parse_spec(spec: str) -> tuple[str, str]:
    provider, sep, ref = spec.partition(":")
    if not sep or not ref:
        raise DistillError(f"teacher spec '{spec}' must look like provider:model, e.g. openai:gpt-4o-mini")
    if provider not in PROVIDERS:
        raise DistillError(f"teacher provider '{provider}' is not available; known: {', '.join(PROVIDERS)}")
    return provider, ref


def build_teacher(spec: str, cfg, labels: list[str] | None = None, schema: dict | None = None) -> Teacher:
    """Turn a spec string and our TeacherConfig into a teacher. Nothing is loaded or connected
    until first use; a network teacher's key and price are resolved here, so a missing one
    fails before any prompt is read."""
    provider, ref = parse_spec(spec)
    if provider not in TEACHERS:
        raise DistillError(f"teacher spec '{spec}' imports answers; it has no calls to make")
    return TEACHERS[provider].from_config(ref, cfg, labels, schema)


def content_files(spec: str) -> dict[str, Path]:
    """Files whose content decides a teacher's answers, for stage fingerprints: a local
    teacher's model folder (config, weights, tokenizer), retrained in place under the same
    path. None for the others: a network teacher is named by its model and URL."""
    from pipeline.llm.loading import model_files

    provider, ref = parse_spec(spec)
    return model_files(ref) if provider == "local" else {}
