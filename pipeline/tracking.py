"""MLflow wrapper: one parent run per pipeline invocation, one nested run per stage.

Everything logged goes through `redact`, so API keys never reach params or artifacts.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|authorization)", re.I)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|sk-ant-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{8,})")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Mask values whose key names a secret, and anything that looks like a key."""
    out = {}
    for key, value in params.items():
        if _SECRET_KEY.search(key) and not key.endswith("_env"):
            out[key] = "***"
        else:
            out[key] = _SECRET_VALUE.sub("***", str(value))
    return out


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        items: dict[str, Any] = {}
        for k, v in obj.items():
            items.update(flatten(v, f"{prefix}{k}."))
        return items
    return {prefix.rstrip("."): obj}


def resolve_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class Tracker:
    """Thin, explicit MLflow facade; built by the runner, never at import."""

    def __init__(self, uri: str, experiment: str):
        import mlflow

        self._mlflow = mlflow
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=_artifact_root(uri))
        mlflow.set_experiment(experiment)
        self.experiment = experiment

    @contextmanager
    def run(self, name: str, nested: bool = False, system_metrics: bool = False) -> Iterator[str]:
        """A (nested) MLflow run; system_metrics samples CPU/GPU/memory use while it is open."""
        with self._mlflow.start_run(run_name=name, nested=nested, log_system_metrics=system_metrics) as active:
            yield active.info.run_id

    def params(self, params: dict[str, Any]) -> None:
        clean = redact(flatten(params))
        # MLflow caps a param value at 6000 characters.
        self._mlflow.log_params({k: str(v)[:6000] for k, v in clean.items()})

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None}
        if finite:
            self._mlflow.log_metrics(finite, step=step)

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=subdir)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=subdir)

    def tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(redact(tags))


def _artifact_root(uri: str) -> str | None:
    """Keep artifacts beside a local SQLite store instead of wherever the cwd happens to be."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None
