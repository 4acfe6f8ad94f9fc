"""Recipe search: one trial per combination of dotted overrides, the best chosen on validation.

    distill sweep RECIPE train.lr=3e-4,1e-3 train.epochs=2,3     (make sweep RECIPE=... ARGS="...")

Each `key=v1,v2` is an axis (the same `key=value` override `distill run` takes, values split on
commas outside brackets, so `train.lora.targets=[q_proj,v_proj],all-linear` is two values); the
trials are their cartesian product. Capture and curate run once, in the recipe's own run folder
(runs/<recipe>/, skipped when unchanged). Each trial has its own folder,
runs/<recipe>/sweeps/<sweep>/<trial>/: the shared capture and curate are hard-linked into it when
the trial's fingerprint for them is the same (a trial that changes a curate field curates its own),
then finetune and evaluate run there.

MLflow: one parent run per sweep (its id kept in <sweep>/sweep.json, so a rerun continues it),
one child run per trial (tag mlflow.parentRunId) holding its stages' runs. The parent gets the
comparison table (results.md), a plot (results.png) and the winner's tags.

The winner is the trial whose tuned student agrees most with the teacher on the **validation**
split (evaluate's tuned_validation_agreement: its tuned student's answers, as served); test stays the
untouched report of the chosen recipe. Ties go to the earlier trial of the grid. A rerun skips
every trial already scored under this parent whose stages are unchanged (fingerprints).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.artifacts import (
    CURATED_DATASET,
    EVAL_REPORT,
    FINETUNE_ADAPTER,
    RunLayout,
    atomic_write_json,
    atomic_write_text,
    read_manifest,
    replace_dir,
    sha256_json,
)
from pipeline.config import Recipe, load_recipe
from pipeline.errors import DistillError
from pipeline.runner import STAGES, resolve_inputs, fingerprint, run_stage
from pipeline.stages import Stage
from pipeline.tracking import Tracker, resolve_uri

log = logging.getLogger(__name__)

SCORE = "validation_agreement"
SHARED = ("capture", "curate")  # run once in the recipe's folder, linked into each trial
TRIAL_STAGES = ("capture", "curate", "finetune", "evaluate")
SWEEP_STATE = "sweep.json"
TRIAL_RECORD = "trial.json"
RESULTS_MD, RESULTS_JSON, RESULTS_PNG = "results.md", "results.json", "results.png"
_STAGE = {s.NAME: s for s in STAGES}


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]


def split_values(text: str) -> list[str]:
    """Commas at bracket/brace depth 0 separate values; a YAML list stays one value."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def parse_axis(item: str) -> Axis:
    key, sep, raw = item.partition("=")
    if not sep or not key or "." not in key:
        raise DistillError(f"sweep axis '{item}' must look like section.key=v1,v2 (e.g. train.lr=3e-4,1e-3)")
    values = tuple(v.strip() for v in split_values(raw))
    if any(not v for v in values):
        raise DistillError(f"sweep axis '{item}': an empty value (a stray comma?)")
    if len(set(values)) != len(values):
        raise DistillError(f"sweep axis '{item}': a value is listed twice")
    return Axis(key, values)


def parse_axes(items: list[str]) -> list[Axis]:
    axes = [parse_axis(item) for item in items]
    if not axes:
        raise DistillError("distill sweep needs at least one axis, e.g. train.lr=3e-4,1e-3")
    keys = [a.key for a in axes]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise DistillError(f"sweep: axis {', '.join(twice)} given twice; list all its values in one key=v1,v2")
    return axes


def grid(axes: list[Axis]) -> list[tuple[str, ...]]:
    """Every combination, as override strings, the first axis varying slowest."""
    return [tuple(f"{a.key}={v}" for a, v in zip(axes, combo)) for combo in itertools.product(*(a.values for a in axes))]


def trial_name(overrides: tuple[str, ...], axes: list[Axis]) -> str:
    """A folder name from the values that vary: stable across reruns and readable."""
    varying = {a.key for a in axes if len(a.values) > 1}
    shown = [o for o in overrides if o.partition("=")[0] in varying] or ["base"]
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", "__".join(shown))
    return name if len(name) <= 96 else f"{name[:80]}-{sha256_json(overrides)[:12]}"


# ---------------------------------------------------------------- the plan


@dataclass
class Trial:
    index: int
    name: str
    overrides: tuple[str, ...]
    recipe: Recipe


@dataclass
class SweepPlan:
    axes: list[Axis]
    base: Recipe  # the recipe with the single-valued axes applied: what the shared stages run with
    trials: list[Trial]
    runs_root: Path
    folder: Path  # runs/<recipe>/sweeps/<sweep id>

    @property
    def varying(self) -> list[str]:
        return [a.key for a in self.axes if len(a.values) > 1]


def plan_sweep(recipe: str, items: list[str], runs_root: Path = Path("runs"), name: str | None = None) -> SweepPlan:
    """Validate every trial's recipe before anything runs; all the errors at once."""
    axes = parse_axes(items)
    base = load_recipe(recipe, [f"{a.key}={a.values[0]}" for a in axes if len(a.values) == 1])
    trials, errors = [], []
    for i, overrides in enumerate(grid(axes)):
        try:
            trials.append(Trial(i, trial_name(overrides, axes), overrides, load_recipe(recipe, list(overrides))))
        except DistillError as err:
            errors.append(f"trial {' '.join(overrides)}: {err}")
    if errors:
        raise DistillError("sweep: " + "; ".join(errors))
    sweep_id = name or "s-" + sha256_json([recipe, [asdict(a) for a in axes]])[:10]
    if not re.fullmatch(r"[A-Za-z0-9._-]+", sweep_id):
        raise DistillError(f"sweep --name '{sweep_id}': use letters, digits, '.', '_' or '-'")
    return SweepPlan(axes, base, trials, runs_root, runs_root / base.name / "sweeps" / sweep_id)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match[1]) < int(match[2]):
        raise DistillError(f"--shard '{text}' must be K/N with 0 <= K < N (e.g. 0/4 on the first of 4 GPUs)")
    return int(match[1]), int(match[2])


# ---------------------------------------------------------------- results


@dataclass
class TrialResult:
    name: str
    index: int
    overrides: list[str]
    run_id: str
    parent_run_id: str
    evaluate_fingerprint: str
    score: dict  # {value, lo, hi, n}: agreement with the teacher on validation, bootstrap 95% CI
    metrics: dict = field(default_factory=dict)  # validation-side and training figures, for the table
    wall_s: float = 0.0


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


@dataclass
class SweepOutcome:
    plan: SweepPlan
    parent_run_id: str
    results: list[TrialResult]  # every trial scored under the parent so far, grid order
    ran: list[str]  # trials trained or scored by this invocation
    winner: TrialResult | None


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
            for trial in plan.trials[shard[0]:: shard[1]]:
                if run_trial(mlflow, tracker, plan, trial, base_layout, parent_id):
                    ran.append(trial.name)
        results = [r for t in plan.trials if (r := read_record(plan.folder / t.name)) and r.parent_run_id == parent_id]
        winner = choose(results) if results else None
        if results:
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
            raise DistillError(f"{state}: its MLflow parent run {parent_id} is not in {mlflow.get_tracking_uri()} "
                               f"(deleted, or another store?); delete {state} to start the sweep anew")
        return mlflow.start_run(run_id=parent_id)
    run = mlflow.start_run(run_name=f"{plan.base.name}/sweep", tags={
        "distill.sweep": plan.folder.name, "distill.sweep.axes": " ".join(f"{a.key}={','.join(a.values)}" for a in plan.axes),
        "distill.sweep.trials": str(len(plan.trials))})
    atomic_write_json(state, {"parent_run_id": run.info.run_id, "axes": [asdict(a) for a in plan.axes],
                              "trials": [{"name": t.name, "overrides": list(t.overrides)} for t in plan.trials]})
    return run


def run_trial(mlflow, tracker: Tracker, plan: SweepPlan, trial: Trial, base_layout: RunLayout,
              parent_id: str) -> bool:
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
    with mlflow.start_run(run_name=f"{plan.base.name}/{trial.name}", nested=True, tags={
            "distill.sweep": plan.folder.name, "distill.sweep.trial": trial.name,
            "distill.sweep.overrides": " ".join(trial.overrides)}) as child:
        tracker.params({"recipe": trial.recipe.model_dump(mode="json")})
        for name in TRIAL_STAGES:
            run_stage(_STAGE[name], trial.recipe, layout, tracker)
        evaluate_fp = read_manifest(layout.stage_dir("evaluate")).fingerprint
        reuse = previous is not None and previous.evaluate_fingerprint == evaluate_fp
        score = previous.score if reuse else validation_agreement(trial.recipe, layout)
        metrics = trial_metrics(layout)
        tracker.metrics({SCORE: score["value"], f"{SCORE}_lo": score["lo"], f"{SCORE}_hi": score["hi"], **metrics})
        record = TrialResult(trial.name, trial.index, list(trial.overrides), child.info.run_id, parent_id,
                             evaluate_fp, score, metrics, time.perf_counter() - start)
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
    return record.evaluate_fingerprint == read_manifest(layout.stage_dir("evaluate")).fingerprint


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


def validation_agreement(recipe: Recipe, layout: RunLayout) -> dict:
    """The tuned student's agreement with the teacher on the validation split, with its
    bootstrap 95% CI: evaluate's `tuned_validation_agreement` (its tuned student's answers to
    validation, as served); regenerated here for a report written before evaluate recorded it."""
    figures = json.loads((layout.stage_dir("evaluate") / EVAL_REPORT).read_text()).get("figures", {})
    if "tuned_validation_agreement" in figures:
        return figures["tuned_validation_agreement"]
    return _regenerated_validation_agreement(recipe, layout)


def _regenerated_validation_agreement(recipe: Recipe, layout: RunLayout) -> dict:
    from datasets import load_from_disk
    from peft import PeftModel

    from pipeline.task import agrees
    from pipeline.stats import mean_figure
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.task import load_task

    task = load_task(recipe.capture.task)
    dataset = load_from_disk(str(layout.stage_dir("curate") / CURATED_DATASET), keep_in_memory=True)
    rows = list(dataset["validation"])[: recipe.eval.limit]
    if not rows:
        raise DistillError(f"{layout.stage_dir('curate')}: the validation split is empty; the sweep chooses on it")
    tokenizer = load_tokenizer(recipe.model.base, recipe.model.chat_template)
    base = load_model(recipe.model.base, device_plan())
    model = PeftModel.from_pretrained(base, str(layout.stage_dir("finetune") / FINETUNE_ADAPTER)).eval()
    answers = _answers(model, tokenizer, [r["prompt"] for r in rows], recipe, task)
    figure = mean_figure([agrees(task, a, r["completion"]) for a, r in zip(answers, rows)],
                         recipe.eval.bootstrap, recipe.eval.seed)
    return figure.to_json()


def _answers(model, tokenizer, prompts: list[str], recipe: Recipe, task) -> list[str]:
    from pipeline.llm.answer import Serving, answer_as_served
    from pipeline.task import Task

    labels = task.labels if task.kind == "classification" else None
    convs = [Task.student_messages(p) for p in prompts]
    return [c.text for c in answer_as_served(model, tokenizer, convs, Serving.of(recipe, labels),
                                             source="sweep (validation)")]


def trial_metrics(layout: RunLayout) -> dict:
    """Validation-side routing figures and training figures for the table; no test figure."""
    report = json.loads((layout.stage_dir("evaluate") / EVAL_REPORT).read_text())["metrics"]
    finetune = read_manifest(layout.stage_dir("finetune"))
    out = {k: report[k] for k in ("expected_local_share", "expected_system_agreement") if report.get(k) is not None}
    if finetune.metrics.get("train_loss") is not None:
        out["train_loss"] = finetune.metrics["train_loss"]
    out["finetune_wall_s"] = finetune.wall_s
    return out


# ---------------------------------------------------------------- the table


def _pct(score: dict) -> str:
    return f"{100 * score['value']:.1f}% [{100 * score['lo']:.1f}, {100 * score['hi']:.1f}]"


def table_rows(plan: SweepPlan, results: list[TrialResult], winner: TrialResult | None) -> list[list[str]]:
    """One row per trial of the grid (unscored ones marked), the columns of `table_header`."""
    by_name = {r.name: r for r in results}
    rows = []
    for trial in plan.trials:
        values = [o.partition("=")[2] for o in trial.overrides if o.partition("=")[0] in plan.varying]
        r = by_name.get(trial.name)
        if r is None:
            rows.append([str(trial.index + 1), *values, "not run yet", "", "", "", ""])
            continue
        m = r.metrics
        share = m.get("expected_local_share")
        loss = m.get("train_loss")
        rows.append([str(trial.index + 1), *values, _pct(r.score), str(r.score["n"]),
                     "—" if share is None else f"{100 * share:.1f}%", "—" if loss is None else f"{loss:.4f}",
                     "winner" if winner is not None and r.name == winner.name else ""])
    return rows


def table_header(plan: SweepPlan) -> list[str]:
    return ["#", *plan.varying, "validation agreement [95% CI]", "n", "local share (val.)", "train loss", ""]


def results_markdown(plan: SweepPlan, outcome_rows: list[list[str]], winner: TrialResult | None, parent_id: str,
                     n_scored: int) -> str:
    header = table_header(plan)
    lines = [f"# Sweep {plan.folder.name}: {plan.base.name}", "",
             f"Chosen on agreement with the teacher on the validation split (never test); ties go to the earlier "
             f"trial. {n_scored}/{len(plan.trials)} trials scored. MLflow parent run `{parent_id}`.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in outcome_rows]
    if winner is not None:
        lines += ["", f"Winner: `{' '.join(winner.overrides)}` (child run `{winner.run_id}`, "
                      f"folder `{plan.folder / winner.name}`)."]
    return "\n".join(lines) + "\n"


def print_table(outcome: SweepOutcome, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    plan = outcome.plan
    table = Table(title=f"sweep {plan.folder.name}: {plan.base.name} (chosen on validation)")
    for column in table_header(plan):
        table.add_column(column)
    for row in table_rows(plan, outcome.results, outcome.winner):
        table.add_row(*row, style="bold green" if row[-1] == "winner" else None)
    console = console or Console()
    console.print(table)
    if outcome.winner is not None:
        console.print(f"winner: {' '.join(outcome.winner.overrides)}  ({plan.folder / outcome.winner.name})",
                      soft_wrap=True)
    missing = len(plan.trials) - len(outcome.results)
    if missing:
        console.print(f"{missing} of {len(plan.trials)} trials not scored yet (other --shard processes, or rerun "
                      "the same command): the winner is among the scored ones only")
    console.print(f"table and plot: {plan.folder / RESULTS_MD}, MLflow parent run {outcome.parent_run_id}",
                  soft_wrap=True)


def plot_scores(path: Path, plan: SweepPlan, results: list[TrialResult], winner: TrialResult | None) -> None:
    """Validation agreement per trial with its 95% CI, the winner highlighted; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r.index)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(results) + 2), 3.6))
    values = [r.score["value"] for r in results]
    errors = [[v - r.score["lo"] for v, r in zip(values, results)], [r.score["hi"] - v for v, r in zip(values, results)]]
    colors = ["tab:green" if winner is not None and r.name == winner.name else "tab:gray" for r in results]
    ax.bar(range(len(results)), values, yerr=errors, color=colors, capsize=3)
    ax.set_xticks(range(len(results)), [str(r.index + 1) for r in results])
    ax.set_xlabel("trial (see results.md)")
    ax.set_ylabel("validation agreement")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{plan.base.name}: sweep {plan.folder.name}")
    from pipeline.evaluation.plots import save_png

    save_png(plt, fig, path)


def _log_summary(mlflow, plan: SweepPlan, results: list[TrialResult], winner: TrialResult) -> None:
    """The table, the plot and the raw results beside the sweep and on the parent run; the winner as tags."""
    parent_id = mlflow.active_run().info.run_id
    rows = table_rows(plan, results, winner)
    atomic_write_text(plan.folder / RESULTS_MD, results_markdown(plan, rows, winner, parent_id, len(results)))
    atomic_write_json(plan.folder / RESULTS_JSON, {"parent_run_id": parent_id, "score": SCORE, "winner": winner.name,
                                                   "trials": [asdict(r) for r in results]})
    plot_scores(plan.folder / RESULTS_PNG, plan, results, winner)
    for name in (RESULTS_MD, RESULTS_JSON, RESULTS_PNG):
        mlflow.log_artifact(str(plan.folder / name))
    mlflow.set_tags({"distill.sweep.winner": winner.name, "distill.sweep.winner_run_id": winner.run_id,
                     "distill.sweep.winner_overrides": " ".join(winner.overrides), "distill.sweep.score": SCORE,
                     "distill.sweep.scored": f"{len(results)}/{len(plan.trials)}"})
    mlflow.log_metric(f"best_{SCORE}", winner.score["value"])
