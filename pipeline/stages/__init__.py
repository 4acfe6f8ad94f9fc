"""One module per stage; each module is a `Stage`. Stages never import each other: they meet
only in artifact folders (names in pipeline/artifacts.py), chained by pipeline/runner.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipeline.artifacts import Manifest
    from pipeline.config import Recipe
    from pipeline.tracking import TrackerProtocol


@runtime_checkable
class Stage(Protocol):
    """The contract a stage module meets (checked for every stage by tests/runner/test_stages.py).

    READS names the recipe fields the stage's output depends on, as dotted paths (a section
    name means all of it): they, the stage's file inputs and its upstream manifests make its
    fingerprint, so changing anything else (serve.port, model.architecture) re-runs nothing."""

    NAME: str
    READS: tuple[str, ...]
    UPSTREAM: tuple[str, ...]
    RESUMABLE: bool  # keeps its partial folder (checkpoints) across an interruption
    ALL_RANKS: bool  # under a multi-process launch every rank runs it (training); else the main process alone
    SYSTEM_METRICS: bool  # the tracker samples CPU/GPU/memory while it runs

    def file_inputs(self, recipe: Recipe) -> dict[str, Path]: ...

    def run(self, recipe: Recipe, inputs: dict[str, Path], out: Path, tracker: TrackerProtocol) -> Manifest: ...
