"""Chain the stages: skip what is unchanged, resume what was interrupted, track it all.

A stage's fingerprint hashes the recipe fields it reads (`Stage.READS`) and its inputs
(files by content, upstream stages by their manifest's output hashes). A stage whose last
manifest has the same fingerprint is skipped, which is how a killed `make distill` resumes.
Each finished stage folder holds `resolved_config.yaml` (the whole recipe it ran with) and
`manifest.json`, written last.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.artifacts import (
    FINGERPRINT,
    RESOLVED_CONFIG,
    Manifest,
    RunLayout,
    atomic_write_text,
    hash_outputs,
    read_manifest,
    replace_dir,
    sha256_file,
    sha256_json,
    write_manifest,
)
from pipeline.config import Recipe, check_input_files, field_values
from pipeline.distributed import Ranks
from pipeline.errors import DistillError
from pipeline.llm.loading import check_training_device, free_memory
from pipeline.stages import Stage, capture, curate, evaluate, export, finetune
from pipeline.tracking import NullTracker, Tracker, TrackerProtocol, redact_tree, resolve_uri

log = logging.getLogger(__name__)

STAGES: tuple[Stage, ...] = (capture, curate, finetune, evaluate, export)
STAGE_NAMES = tuple(s.NAME for s in STAGES)


@dataclass
class StageOutcome:
    name: str
    manifest: Manifest
    skipped: bool
    wall_s: float


@dataclass
class PipelineResult:
    run_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)

    def manifest(self, stage: str) -> Manifest | None:
        return next((o.manifest for o in self.outcomes if o.name == stage), None)

    def skipped(self, stage: str) -> bool:
        return any(o.skipped for o in self.outcomes if o.name == stage)


def stages_until(until: str | None) -> tuple[Stage, ...]:
    if until is None:
        return STAGES
    if until not in STAGE_NAMES:
        raise DistillError(f"unknown stage '{until}'; stages: {', '.join(STAGE_NAMES)}")
    return STAGES[: STAGE_NAMES.index(until) + 1]


def run_pipeline(
    recipe: Recipe,
    until: str | None = None,
    runs_root: Path = Path("runs"),
    force: bool = False,
    ranks: Ranks | None = None,
    run_name: str | None = None,
) -> PipelineResult:
    """Every stage up to `until`, in `runs_root/<run_name>` (default: the recipe name; a
    retrain round is `runs/<recipe>/rounds/r<N>`). Under a multi-process launch only the main
    process writes folders and MLflow runs; the other ranks get a NullTracker and join ALL_RANKS stages."""
    check_input_files(recipe, recipe.name)
    ranks = ranks or Ranks.detect()
    stages = stages_until(until)
    layout = RunLayout(runs_root, run_name or recipe.name)
    if finetune in stages and (force or read_manifest(layout.stage_dir(finetune.NAME)) is None):
        # A CPU-only torch, or several GPUs without a launcher: said now, not after capture has spent.
        check_training_device(recipe, ranks.count)
    if ranks.main:
        layout.root.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(resolve_uri(recipe.tracking.uri), recipe.tracking.experiment) if ranks.main else NullTracker()
    result = PipelineResult(layout.root)
    with tracker.run(recipe.name if run_name is None else f"{recipe.name}/{run_name}"):
        tracker.params({"recipe": recipe.model_dump(mode="json")})
        for stage in stages:
            result.outcomes.append(run_stage(stage, recipe, layout, tracker, force, ranks))
        tracker.metrics({f"{o.name}_wall_s": o.wall_s for o in result.outcomes})
    if ranks.main:
        layout.point_latest()
    return result


def fingerprint(stage: Stage, recipe: Recipe, input_hashes: dict[str, str]) -> str:
    return sha256_json({"stage": stage.NAME, "config": field_values(recipe, stage.READS), "inputs": input_hashes})


def run_stage(
    stage: Stage,
    recipe: Recipe,
    layout: RunLayout,
    tracker: TrackerProtocol,
    force: bool = False,
    ranks: Ranks = Ranks(),
) -> StageOutcome:
    if ranks.count > 1 and not stage.ALL_RANKS:
        return _on_main_only(stage, recipe, layout, tracker, force, ranks)
    inputs, input_hashes = resolve_inputs(stage, recipe, layout)
    fingerprint_ = fingerprint(stage, recipe, input_hashes)
    final = layout.stage_dir(stage.NAME)
    previous = read_manifest(final)
    if previous and previous.fingerprint == fingerprint_ and not force:
        log.info("%s: unchanged since %s, skipped", stage.NAME, previous.created_at)
        return StageOutcome(stage.NAME, previous, skipped=True, wall_s=0.0)

    partial = layout.partial_dir(stage.NAME)
    if ranks.main:
        _prepare_partial(partial, fingerprint_, stage.RESUMABLE)
    ranks.barrier()  # the other ranks train into the folder the main process prepared
    log.info("%s: running", stage.NAME)
    start = time.perf_counter()
    with tracker.run(stage.NAME, nested=True, system_metrics=stage.SYSTEM_METRICS):
        try:
            manifest = stage.run(recipe, inputs, partial, tracker)
        finally:
            # The stage's models must not sit in GPU memory while the next stage loads its own: its
            # locals are gone, but the Trainer and accelerate's hooks leave cycles only gc frees.
            free_memory()
        if ranks.main:
            write_resolved_config(partial, recipe)
            manifest.fingerprint = fingerprint_
            manifest.inputs = input_hashes
            manifest.wall_s = time.perf_counter() - start
            manifest.outputs = hash_outputs(partial)
            write_manifest(partial, manifest)  # last: a folder without it is incomplete
    if ranks.main:
        (partial / FINGERPRINT).unlink(missing_ok=True)
        replace_dir(partial, final)
    ranks.barrier()  # nobody moves on before the folder is in place
    return StageOutcome(stage.NAME, manifest, skipped=False, wall_s=time.perf_counter() - start)


def _on_main_only(
    stage: Stage, recipe: Recipe, layout: RunLayout, tracker: TrackerProtocol, force: bool, ranks: Ranks
) -> StageOutcome:
    """A stage that must run once: the main process runs it, the other ranks wait, then read its manifest."""
    outcome = run_stage(stage, recipe, layout, tracker, force) if ranks.main else None
    ranks.barrier()
    if outcome is not None:
        return outcome
    manifest = read_manifest(layout.stage_dir(stage.NAME))
    if manifest is None:
        raise DistillError(f"rank {ranks.index}: {stage.NAME} did not complete on the main process")
    return StageOutcome(stage.NAME, manifest, skipped=True, wall_s=0.0)


def write_resolved_config(folder: Path, recipe: Recipe) -> None:
    """The whole recipe the stage ran with (secrets masked), like litgpt's saved hyperparameters."""
    atomic_write_text(
        folder / RESOLVED_CONFIG, yaml.safe_dump(redact_tree(recipe.model_dump(mode="json")), sort_keys=False)
    )


def resolve_inputs(stage: Stage, recipe: Recipe, layout: RunLayout) -> tuple[dict[str, Path], dict[str, str]]:
    inputs: dict[str, Path] = {}
    hashes: dict[str, str] = {}
    for name, path in stage.file_inputs(recipe).items():
        if not Path(path).is_file():
            raise DistillError(f"{path}: file not found (needed by {stage.NAME} as {name})")
        inputs[name], hashes[name] = Path(path), sha256_file(Path(path))
    for upstream in stage.UPSTREAM:
        manifest = read_manifest(layout.stage_dir(upstream))
        if manifest is None:
            raise DistillError(f"{stage.NAME} needs {upstream}, which has not completed in {layout.root}")
        inputs[upstream], hashes[upstream] = layout.stage_dir(upstream), sha256_json(manifest.outputs)
    return inputs, hashes


def _prepare_partial(partial: Path, fingerprint: str, keep: bool) -> Path:
    """Reuse a partial folder left by an interrupted attempt with the same fingerprint
    (resumable stages only); anything else starts clean."""
    marker = partial / FINGERPRINT
    same = marker.is_file() and marker.read_text() == fingerprint
    if partial.exists() and not (keep and same):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fingerprint)
    return partial
