"""Running a sweep: the shared stages once, each trial under its own MLflow child run, the
scores and the winner recorded beside the sweep and on the parent run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.artifacts import (
    EVAL_REPORT,
    RunLayout,
    atomic_write_json,
    atomic_write_text,
    finished_manifest,
    read_manifest,
    replace_dir,
)
from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.evaluation.plots import plot_interval_bars
from pipeline.runner import STAGES, fingerprint, resolve_inputs, run_stage
from pipeline.stages import Stage
from pipeline.sweep.plan import RESULTS_JSON, RESULTS_MD, RESULTS_PNG, SweepOutcome, SweepPlan, Trial, TrialResult
from pipeline.sweep.table import results_markdown, table_rows
from pipeline.tracking import Tracker, resolve_uri

log = logging.getLogger(__name__)

SCORE = "validation_agreement"
SHARED = ("capture", "curate")  # run once in the recipe's folder, linked into each trial
TRIAL_STAGES = ("capture", "curate", "finetune", "evaluate")
SWEEP_STATE = "sweep.json"
TRIAL_RECORD = "trial.json"
_STAGE = {s.NAME: s for s in STAGES}


def read_record(folder: Path) -> TrialResult | None:
    path = folder / TRIAL_RECORD
    if not path.is_file():
        return None
    try:
        return TrialResult(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise DistillError(f"{path}: unreadable trial record ({err}); delete it to rescore the trial") from None


def choose(results: list[TrialResult]) -> TrialResult:
    """Best validation agreement; a tie goes to the earlier trial of the grid."""
    return max(sorted(results, key=lambda r: r.index), key=lambda r: r.score["value"])


# ---------------------------------------------------------------- running


def run_sweep(plan: SweepPlan, shard: tuple[int, int] = (0, 1), prepare_only: bool = False) -> SweepOutcome:
    import mlflow

    tracker = Tracker(resolve_uri(plan.base.tracking.uri), plan.base.tracking.experiment)
    base_layout = RunLayout(plan.runs_root, plan.base.name)
    base_layout.root.mkdir(parents=True, exist_ok=True)
    with _parent_run(mlflow, plan) as parent:
        parent_id = parent.info.run_id
        for name in SHARED:
            run_stage(_STAGE[name], plan.base, base_layout, tracker)
        ran = []
        if not prepare_only:
            for trial in plan.trials[shard[0] :: shard[1]]:
                if run_trial(mlflow, tracker, plan, trial, base_layout, parent_id):
                    ran.append(trial.name)
        results = [r for t in plan.trials if (r := read_record(plan.folder / t.name)) and r.parent_run_id == parent_id]
        winner = None
        if results:
            winner = choose(results)
            _log_summary(mlflow, plan, results, winner)
    return SweepOutcome(plan, parent_id, results, ran, winner)


def _parent_run(mlflow, plan: SweepPlan):
    """The sweep's parent run: continued when sweep.json names one, else created and recorded
    at once, so every later trial and every parallel process lands under the same parent."""
    from mlflow.exceptions import MlflowException

    state = plan.folder / SWEEP_STATE
    if state.is_file():
        parent_id = json.loads(state.read_text())["parent_run_id"]
        try:
            deleted = mlflow.tracking.MlflowClient().get_run(parent_id).info.lifecycle_stage == "deleted"
        except MlflowException:
            deleted = True
        if deleted:
            raise DistillError(
                f"{state}: its MLflow parent run {parent_id} is not in {mlflow.get_tracking_uri()} "
                f"(deleted, or another store?); delete {state} to start the sweep anew"
            )
        return mlflow.start_run(run_id=parent_id)
    run = mlflow.start_run(
        run_name=f"{plan.base.name}/sweep",
        tags={
            "distill.sweep": plan.folder.name,
            "distill.sweep.axes": " ".join(f"{a.key}={','.join(a.values)}" for a in plan.axes),
            "distill.sweep.trials": str(len(plan.trials)),
        },
    )
    atomic_write_json(
        state,
        {
            "parent_run_id": run.info.run_id,
            "axes": [asdict(a) for a in plan.axes],
            "trials": [{"name": t.name, "overrides": list(t.overrides)} for t in plan.trials],
        },
    )
    return run


def run_trial(mlflow, tracker: Tracker, plan: SweepPlan, trial: Trial, base_layout: RunLayout, parent_id: str) -> bool:
    """Train, evaluate and score one trial under its own child run; False when it was done already."""
    layout = RunLayout(plan.folder, trial.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    link_shared(trial.recipe, layout, base_layout)
    previous = read_record(layout.root)
    if previous and previous.parent_run_id == parent_id and up_to_date(trial.recipe, layout, previous):
        log.info("sweep: %s unchanged and scored (child run %s), skipped", trial.name, previous.run_id)
        return False
    log.info("sweep: trial %d/%d %s", trial.index + 1, len(plan.trials), " ".join(trial.overrides))
    start = time.perf_counter()
    with mlflow.start_run(
        run_name=f"{plan.base.name}/{trial.name}",
        nested=True,
        tags={
            "distill.sweep": plan.folder.name,
            "distill.sweep.trial": trial.name,
            "distill.sweep.overrides": " ".join(trial.overrides),
        },
    ) as child:
        tracker.params({"recipe": trial.recipe.model_dump(mode="json")})
        for name in TRIAL_STAGES:
            run_stage(_STAGE[name], trial.recipe, layout, tracker)
        evaluate_fp = finished_manifest(layout.stage_dir("evaluate")).fingerprint
        reuse = previous is not None and previous.evaluate_fingerprint == evaluate_fp
        score = previous.score if reuse and previous is not None else validation_agreement(layout)
        metrics = trial_metrics(layout)
        tracker.metrics({SCORE: score["value"], f"{SCORE}_lo": score["lo"], f"{SCORE}_hi": score["hi"], **metrics})
        record = TrialResult(
            trial.name,
            trial.index,
            list(trial.overrides),
            child.info.run_id,
            parent_id,
            evaluate_fp,
            score,
            metrics,
            time.perf_counter() - start,
        )
    atomic_write_json(layout.root / TRIAL_RECORD, asdict(record))
    return True


def stage_fingerprint(stage: Stage, recipe: Recipe, layout: RunLayout) -> str | None:
    """What the runner would compare with the stage's manifest; None while an upstream is missing."""
    try:
        _, hashes = resolve_inputs(stage, recipe, layout)
    except DistillError:
        return None
    return fingerprint(stage, recipe, hashes)


def up_to_date(recipe: Recipe, layout: RunLayout, record: TrialResult) -> bool:
    """Every stage of the trial would be skipped, and its score is of the current evaluation."""
    for name in TRIAL_STAGES:
        manifest = read_manifest(layout.stage_dir(name))
        if manifest is None or manifest.fingerprint != stage_fingerprint(_STAGE[name], recipe, layout):
            return False
    return record.evaluate_fingerprint == finished_manifest(layout.stage_dir("evaluate")).fingerprint


def link_shared(recipe: Recipe, layout: RunLayout, base_layout: RunLayout) -> None:
    """Hard-link the recipe folder's capture and curate into the trial's folder when the trial
    would compute the same (same fingerprint); otherwise the trial runs its own."""
    for name in SHARED:
        shared = read_manifest(base_layout.stage_dir(name))
        wanted = stage_fingerprint(_STAGE[name], recipe, layout)
        if shared is None or wanted is None or shared.fingerprint != wanted:
            return  # from here on the trial computes its own (curate follows its own capture)
        mine = read_manifest(layout.stage_dir(name))
        if mine is None or mine.fingerprint != wanted:
            link_tree(base_layout.stage_dir(name), layout.stage_dir(name))


def link_tree(src: Path, final: Path) -> None:
    """A hard-linked copy (a plain copy across filesystems), put in place with one rename."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        shutil.copytree(src, tmp / "tree", copy_function=_link_or_copy)
        replace_dir(tmp / "tree", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------- the validation score


def validation_agreement(layout: RunLayout) -> dict:
    """The tuned student's agreement with the teacher on the validation split, with its bootstrap
    95% CI: evaluate's `tuned_validation_agreement` (its answers as served, `answer_as_served`)."""
    report = layout.stage_dir("evaluate") / EVAL_REPORT
    figures = json.loads(report.read_text()).get("figures", {})
    if "tuned_validation_agreement" not in figures:
        raise DistillError(f"{report} has no tuned_validation_agreement; rerun `distill evaluate` on this trial")
    return figures["tuned_validation_agreement"]


def trial_metrics(layout: RunLayout) -> dict:
    """Validation-side routing figures and training figures for the table; no test figure."""
    report = json.loads((layout.stage_dir("evaluate") / EVAL_REPORT).read_text())["metrics"]
    finetune = finished_manifest(layout.stage_dir("finetune"))
    out = {k: report[k] for k in ("expected_local_share", "expected_system_agreement") if report.get(k) is not None}
    if finetune.metrics.get("train_loss") is not None:
        out["train_loss"] = finetune.metrics["train_loss"]
    out["finetune_wall_s"] = finetune.wall_s
    return out


def _log_summary(mlflow, plan: SweepPlan, results: list[TrialResult], winner: TrialResult) -> None:
    """The table, the plot and the raw results beside the sweep and on the parent run; the winner as tags."""
    parent_id = mlflow.active_run().info.run_id
    rows = table_rows(plan, results, winner)
    atomic_write_text(plan.folder / RESULTS_MD, results_markdown(plan, rows, winner, parent_id, len(results)))
    atomic_write_json(
        plan.folder / RESULTS_JSON,
        {"parent_run_id": parent_id, "score": SCORE, "winner": winner.name, "trials": [asdict(r) for r in results]},
    )
    ordered = sorted(results, key=lambda r: r.index)
    plot_interval_bars(
        plan.folder / RESULTS_PNG,
        [str(r.index + 1) for r in ordered],
        [r.score for r in ordered],
        highlight=[r.name == winner.name for r in ordered],
        xlabel="trial (see results.md)",
        ylabel="validation agreement",
        title=f"{plan.base.name}: sweep {plan.folder.name}",
    )
    for name in (RESULTS_MD, RESULTS_JSON, RESULTS_PNG):
        mlflow.log_artifact(str(plan.folder / name))
    mlflow.set_tags(
        {
            "distill.sweep.winner": winner.name,
            "distill.sweep.winner_run_id": winner.run_id,
            "distill.sweep.winner_overrides": " ".join(winner.overrides),
            "distill.sweep.score": SCORE,
            "distill.sweep.scored": f"{len(results)}/{len(plan.trials)}",
        }
    )
    mlflow.log_metric(f"best_{SCORE}", winner.score["value"])
