"""MLflow wrapper: one parent run per pipeline invocation, one nested run per stage.

Everything logged goes through `redact`, so API keys never reach params or artifacts.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
# A key naming a secret. "token" only as the last word (hf_token, access_token): max_new_tokens is no secret.
_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|authorization|(?:^|[._-])(?:access_|auth_|hf_)?token$)", re.I)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|sk-ant-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{8,})")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Mask values whose key names a secret, and anything that looks like a key."""
    out = {}
    for key, value in params.items():
        if _SECRET_KEY.search(key) and not key.endswith(("_env", "_file")):
            out[key] = "***"
        else:
            out[key] = _SECRET_VALUE.sub("***", str(value))
    return out


def redact_tree(obj: Any, key: str = "") -> Any:
    """`redact` for a nested structure that keeps its shape and types (for YAML/JSON artifacts)."""
    if isinstance(obj, dict):
        return {k: redact_tree(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_tree(v, key) for v in obj]
    if key and _SECRET_KEY.search(key) and not key.endswith(("_env", "_file")) and obj is not None:
        return "***"
    if isinstance(obj, str):
        return _SECRET_VALUE.sub("***", obj)
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        items: dict[str, Any] = {}
        for k, v in obj.items():
            items.update(flatten(v, f"{prefix}{k}."))
        return items
    return {prefix.rstrip("."): obj}


def resolve_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@runtime_checkable
class TrackerProtocol(Protocol):
    """What a stage may do with its tracker: the MLflow `Tracker`, or `NullTracker` in tests and benches."""

    def run(self, name: str, nested: bool = False, system_metrics: bool = False): ...

    def params(self, params: dict[str, Any]) -> None: ...

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def artifact(self, path: Path, subdir: str | None = None) -> None: ...


class NullTracker:
    """Sends nothing anywhere; keeps what it was given in memory, so a test can read it back.

    Params go through the same `redact` + `flatten` as MLflow's, so a secret a stage hands
    its tracker shows up here exactly as it would in MLflow."""

    def __init__(self) -> None:
        self.logged_params: dict[str, Any] = {}
        self.logged_metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []

    @contextmanager
    def run(self, name: str, nested: bool = False, system_metrics: bool = False) -> Iterator[str]:
        yield name

    def params(self, params: dict[str, Any]) -> None:
        self.logged_params.update(redact(flatten(params)))

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged_metrics.append((step, {k: float(v) for k, v in metrics.items() if v is not None}))

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        self.artifacts.append((Path(path), subdir))

    def register_model(self, name: str, source: str, tags: dict[str, str], description: str = "") -> str:
        """Record a model-registry registration in memory; versions count up per name like MLflow's."""
        self.registered = getattr(self, "registered", [])
        version = str(1 + sum(r["name"] == name for r in self.registered))
        self.registered.append({"name": name, "source": source, "tags": dict(tags), "version": version})
        return version

    def last_metrics(self) -> dict[str, float]:
        """Every metric's latest value, whatever step it was logged at."""
        merged: dict[str, float] = {}
        for _, values in self.logged_metrics:
            merged.update(values)
        return merged


class Tracker:
    """Thin, explicit MLflow facade; built by the runner, never at import."""

    def __init__(self, uri: str, experiment: str):
        import mlflow

        # mlflow sets its own logger to INFO when first imported, which prints database
        # migrations on the console (and before our one-line errors); keep it to warnings.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
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

    def register_model(self, name: str, source: str, tags: dict[str, str], description: str = "") -> str:
        """A new version of registered model `name` (created when missing) whose source is
        `source`, linked to the active (stage) run, with `tags`; returns the version number."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        try:
            client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            client.create_registered_model(name, description="Distilled student exported by distill")
        active = self._mlflow.active_run()
        version = client.create_model_version(
            name,
            source=source,
            run_id=active.info.run_id if active else None,
            tags={k: str(v) for k, v in redact(tags).items()},
            description=description,
        )
        return str(version.version)


def _artifact_root(uri: str) -> str | None:
    """Keep artifacts beside a local SQLite store instead of wherever the cwd happens to be."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None
