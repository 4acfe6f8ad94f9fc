"""Aliases in the MLflow model registry: which version serves, which is canaried, how to go back.

    distill promote RECIPE [VERSION]   champion -> VERSION (default: the `candidate` alias); previous -> old champion
    distill rollback RECIPE            champion -> the version it replaced
    distill serve RECIPE --model models:/<name>@champion

Export registers one version per accepted artifact; the loop deals in the `merged` one (what
the router serves). A version's source is the artifact folder on disk,
`<run dir>/export/merged`, so its run's router policy is `<run dir>/evaluate/router_policy.json`.
The champion's history is a JSON list in the registered model's tag `champion_history`, so a
rollback can go back more than once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import EVAL_POLICY
from pipeline.errors import DistillError

CHAMPION, CANDIDATE, PREVIOUS = "champion", "candidate", "previous"
HISTORY_TAG = "champion_history"
# Set by `distill retrain` on a candidate: "true" when it is worse than the champion beyond the CI.
WORSE_TAG = "compare.significantly_worse"
VERDICT_TAG = "compare.verdict"
MODEL_URI = re.compile(r"^models:/(?P<name>[^@/]+)@(?P<alias>[A-Za-z0-9_\-]+)$")


@dataclass(frozen=True)
class ServedVersion:
    """One registered version, with what the router needs to serve it."""

    name: str
    version: str
    source: Path  # the merged model folder
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return self.source.parent.parent

    @property
    def policy_path(self) -> Path | None:
        path = self.run_dir / "evaluate" / EVAL_POLICY
        return path if path.is_file() else None

    @property
    def round(self) -> int | None:
        value = self.tags.get("round")
        return int(value) if value is not None and value.isdigit() else None


def parse_model_uri(uri: str) -> tuple[str, str]:
    """`models:/<name>@<alias>` -> (name, alias)."""
    match = MODEL_URI.match(uri)
    if not match:
        raise DistillError(f"'{uri}': expected models:/<registered name>@<alias>, e.g. models:/my-task@champion")
    return match["name"], match["alias"]


class Registry:
    """The MLflow registry at `uri` (the tracking store: sqlite:///mlflow.db by default)."""

    def __init__(self, uri: str):
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # ------------------------------------------------------------ reading

    def version(self, name: str, version: str) -> ServedVersion:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(name, str(version))
        except MlflowException as err:
            raise DistillError(f"registry {self.uri}: {name} has no version {version}") from err
        return self._served(mv)

    def resolve(self, name: str, alias: str) -> ServedVersion | None:
        """The version `alias` points at, or None when the alias (or the model) is not there.
        Any other registry failure (a locked or unreachable store) raises: it says nothing
        about the alias, and a router following it must not take it for a removed alias."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            # MLflow answers a missing model with RESOURCE_DOES_NOT_EXIST, a missing alias with
            # INVALID_PARAMETER_VALUE.
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise DistillError(f"registry {self.uri}: cannot read {name}@{alias}: {err.message}") from err
        return self._served(mv)

    def require(self, name: str, alias: str) -> ServedVersion:
        served = self.resolve(name, alias)
        if served is None:
            raise DistillError(
                f"registry {self.uri}: {name} has no '{alias}' alias "
                f"(`distill promote` sets champion; `distill retrain` sets candidate)"
            )
        return served

    def versions(self, name: str) -> list[ServedVersion]:
        """Every version of `name`, oldest first."""
        found = self.client.search_model_versions(f"name='{name}'")
        return sorted((self._served(mv) for mv in found), key=lambda v: int(v.version))

    def merged_version_for(self, name: str, run_dir: Path) -> ServedVersion | None:
        """The newest `merged` version whose source is this run's export (what export registered)."""
        target = (Path(run_dir) / "export" / "merged").resolve()
        hits = [v for v in self.versions(name) if v.tags.get("artifact") == "merged" and v.source.resolve() == target]
        return hits[-1] if hits else None

    def history(self, name: str) -> list[str]:
        tags = self.client.get_registered_model(name).tags
        return json.loads(tags.get(HISTORY_TAG, "[]"))

    # ------------------------------------------------------------ writing

    def tag(self, name: str, version: str, tags: dict[str, object]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, str(version), key, str(value))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def drop_alias(self, name: str, alias: str) -> None:
        if self.resolve(name, alias) is not None:
            self.client.delete_registered_model_alias(name, alias)

    def promote(self, name: str, version: str | None = None, force: bool = False) -> ServedVersion:
        """Make `version` (default: the candidate) the champion; the old champion becomes `previous`.
        A candidate that `distill retrain` found worse than the champion beyond the CI is refused
        unless `force`."""
        target = self.version(name, version) if version else self.require(name, CANDIDATE)
        if target.tags.get(WORSE_TAG) == "true" and not force:
            raise DistillError(
                f"{name} version {target.version} is worse than the champion beyond the CI "
                f"({target.tags.get(VERDICT_TAG, 'keep')}); see its comparison report, "
                "or pass --force to promote it anyway"
            )
        current = self.resolve(name, CHAMPION)
        if current is not None and current.version == target.version:
            return target
        if current is not None:
            self.set_alias(name, PREVIOUS, current.version)
        self.set_alias(name, CHAMPION, target.version)
        candidate = self.resolve(name, CANDIDATE)
        if candidate is not None and candidate.version == target.version:
            self.drop_alias(name, CANDIDATE)  # nothing left to canary
        self._set_history(name, [*self.history(name), target.version])
        return self.version(name, target.version)

    def rollback(self, name: str) -> ServedVersion:
        """Champion back to the version it replaced; `previous` to the one before that."""
        history = self.history(name)
        if len(history) < 2:
            raise DistillError(f"{name}: nothing to roll back to (champion history: {history or 'empty'})")
        history = history[:-1]
        self.set_alias(name, CHAMPION, history[-1])
        if len(history) >= 2:
            self.set_alias(name, PREVIOUS, history[-2])
        else:
            self.drop_alias(name, PREVIOUS)
        self._set_history(name, history)
        return self.version(name, history[-1])

    def _set_history(self, name: str, history: list[str]) -> None:
        self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))

    def _served(self, mv) -> ServedVersion:
        source = mv.source.removeprefix("file://")
        return ServedVersion(mv.name, str(mv.version), Path(source), dict(mv.tags or {}), tuple(mv.aliases or ()))
