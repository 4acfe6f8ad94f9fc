"""`distill retrain RECIPE`: round N of the loop, from the router's escalations to a registered candidate.

    runs/<recipe>/                  round 0 (`make distill`), the first champion
    runs/<recipe>/rounds/
      frozen_test.jsonl             round 0's test split, copied once: every round is judged on it
      r<N>/gather/                  gathered.jsonl (training pool), escalated_slice.jsonl, gather.json
      r<N>/capture ... export/      the usual stage folders, made by the usual runner
      r<N>/compare/                 report.json, report.md: candidate vs champion, promote or keep

1. Gather (gather.py): the previous round's records plus the new escalations; nothing is asked
   of the teacher again. 2. Curate, finetune, evaluate, export round N with the same recipe,
   its capture taking the gathered records as they are and its test split frozen at round 0's.
3. Compare (compare.py) with the champion. 4. Tag the candidate's registered version with the
   round and the verdict, point the `candidate` alias at it, and log the comparison to MLflow.
Promotion is a separate, deliberate step (`distill promote`). A round without a comparison
report is unfinished: rerunning `distill retrain` resumes it (unchanged stages are skipped).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pipeline.artifacts import (
    EVAL_REPORT,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    read_jsonl,
    write_jsonl,
)
from pipeline.config import Recipe, validate_recipe
from pipeline.conversation import Shape
from pipeline.errors import DistillError
from pipeline.loop import compare
from pipeline.loop.gather import Gathered, Mix, gather, prompt_key
from pipeline.registry import CANDIDATE, CHAMPION, VERDICT_TAG, WORSE_TAG, Registry, ServedVersion

log = logging.getLogger(__name__)

FROZEN_TEST, FROZEN_VALIDATION = "frozen_test.jsonl", "frozen_validation.jsonl"
GATHERED, SLICE, GATHER_SUMMARY = "gathered.jsonl", "escalated_slice.jsonl", "gather.json"
COMPARE_JSON, COMPARE_MD = "report.json", "report.md"


@dataclass(frozen=True)
class Rounds:
    """Where the rounds of one recipe live."""

    base: Path  # runs/<recipe>: round 0

    @property
    def root(self) -> Path:
        return self.base / "rounds"

    def run_dir(self, n: int) -> Path:
        return self.base if n == 0 else self.root / f"r{n}"

    def done(self, n: int) -> bool:
        return n == 0 or (self.run_dir(n) / "compare" / COMPARE_JSON).is_file()

    def next(self) -> int:
        """The first round without a comparison report (an interrupted one resumes)."""
        n = 1
        while self.run_dir(n).is_dir() and self.done(n):
            n += 1
        return n


@dataclass
class RoundResult:
    round: int
    run_dir: Path
    report: dict
    candidate: ServedVersion


def retrain(recipe: Recipe, runs_root: Path = Path("runs"), escalations: list[Path] | None = None) -> RoundResult:
    from pipeline.runner import run_pipeline
    from pipeline.tracking import resolve_uri

    if not recipe.export.registry:
        raise DistillError("retrain registers each candidate: export.registry must stay true")
    name = registered_name(recipe)
    rounds = Rounds(runs_root / recipe.name)
    registry = Registry(resolve_uri(recipe.tracking.uri))
    champion = registry.resolve(name, CHAMPION) or first_champion(registry, name, rounds.base)
    n = rounds.next()
    frozen = freeze(rounds)
    gathered = gather_round(recipe, rounds, n, frozen, escalations)
    log.info(
        "retrain round %d: %d new records, %d held back, champion is version %s",
        n,
        len(gathered.added),
        len(gathered.slice),
        champion.version,
    )

    round_recipe = round_recipe_for(recipe, rounds, n, frozen, champion)
    run_pipeline(round_recipe, runs_root=rounds.root, run_name=f"r{n}")
    candidate = registry.merged_version_for(name, rounds.run_dir(n))
    if candidate is None:
        raise DistillError(
            f"round {n}: export registered no merged version of {name} (see "
            f"{rounds.run_dir(n) / 'export' / 'parity.md'})"
        )
    report = compare_round(recipe, champion, candidate, rounds.run_dir(n), gathered.slice)
    summary = {"round": n, **gathered.summary()}
    publish(recipe, registry, name, candidate, report, summary, rounds.run_dir(n) / "compare", n)
    return RoundResult(n, rounds.run_dir(n), report, registry.version(name, candidate.version))


def registered_name(recipe: Recipe) -> str:
    return recipe.export.model_name or recipe.name


def first_champion(registry: Registry, name: str, base: Path) -> ServedVersion:
    """No champion yet: round 0's registered merged export becomes it (it is what serves today)."""
    version = registry.merged_version_for(name, base)
    if version is None:
        raise DistillError(
            f"no registered merged export of {name} for {base} in {registry.uri}: run `make distill` (round 0) first"
        )
    registry.tag(name, version.version, {"round": 0})
    log.info("retrain: %s version %s (round 0) is the first champion", name, version.version)
    return registry.promote(name, version.version)


@dataclass(frozen=True)
class Frozen:
    """Round 0's test and validation splits, every round's: the test split so every round is judged
    on the same prompts; the validation split because a candidate warm-started from the champion
    must not calibrate its threshold on prompts the champion trained on, which a re-split would give it."""

    test: Path
    validation: Path


def freeze(rounds: Rounds) -> Frozen:
    """Round 0's splits, copied on the first retrain and never rewritten after."""
    return Frozen(_freeze(rounds, "test", FROZEN_TEST), _freeze(rounds, "validation", FROZEN_VALIDATION))


def _freeze(rounds: Rounds, split: str, name: str) -> Path:
    frozen = rounds.root / name
    if not frozen.is_file():
        source = rounds.base / "curate" / f"{split}.jsonl"
        if not source.is_file():
            raise DistillError(f"{source}: round 0 has no curated {split} split; run `make distill` first")
        rounds.root.mkdir(parents=True, exist_ok=True)
        tmp = frozen.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(frozen)
    return frozen


def gather_round(recipe: Recipe, rounds: Rounds, n: int, frozen: Frozen, escalations: list[Path] | None) -> Gathered:
    """Round n's training pool and escalated slice, written to r<n>/gather/. The pool is what the
    champion trained on (the previous round's train split, not its whole capture: re-selecting
    curate.target_size from the capture would drop most escalations again, and every record of a
    labelled logs file would count as known; `retrain.replay` of it) plus the new escalations
    (weighted by `retrain.escalation_weight`); validation and test stay round 0's."""
    previous = read_jsonl(rounds.run_dir(n - 1) / "curate" / "train.jsonl")
    excluded = {prompt_key(r) for path in (frozen.test, frozen.validation) for r in read_jsonl(path)}
    for earlier in range(1, n):
        excluded |= {prompt_key(r) for r in read_jsonl(rounds.run_dir(earlier) / "gather" / SLICE)}
    files = escalation_files(recipe, escalations)
    mix = Mix(recipe.retrain.replay, recipe.retrain.escalation_weight)
    gathered = gather(previous, files, excluded, recipe.retrain.holdout, n, mix)
    if len(gathered.added) < recipe.retrain.min_new:
        raise DistillError(
            f"retrain round {n}: {len(gathered.added)} new training records from "
            f"{', '.join(map(str, files))} (retrain.min_new={recipe.retrain.min_new}; "
            f"skipped: {dict(gathered.skipped) or 'none'}); serve more traffic first"
        )
    out = rounds.run_dir(n) / "gather"
    write_jsonl(out / GATHERED, gathered.pool)
    write_jsonl(out / SLICE, gathered.slice)
    atomic_write_json(
        out / GATHER_SUMMARY, {"round": n, "escalation_files": [str(f) for f in files], **gathered.summary()}
    )
    return gathered


def escalation_files(recipe: Recipe, given: list[Path] | None) -> list[Path]:
    """What to gather: the files given, else retrain.escalations, else the router's log and its rotation."""
    files = list(given or recipe.retrain.escalations)
    if not files:
        log_path = Path(recipe.serve.escalations)
        files = [p for p in (log_path.with_name(log_path.name + ".1"), log_path) if p.is_file()] or [log_path]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DistillError(f"{missing[0]}: no escalations file (the router writes serve.escalations as it serves)")
    return [Path(f) for f in files]


def round_recipe_for(recipe: Recipe, rounds: Rounds, n: int, frozen: Frozen, champion: ServedVersion) -> Recipe:
    """The user's recipe, with capture taking the gathered records and the test split frozen."""
    fields: dict[str, Any] = {
        "capture.records": str(rounds.run_dir(n) / "gather" / GATHERED),
        "curate.frozen_test": str(frozen.test),
        "export.model_name": registered_name(recipe),
        "curate.frozen_validation": str(frozen.validation),
        "curate.target_size": None,  # the gathered pool is already a selection: keep all of it
    }
    if recipe.retrain.warm_start:
        fields["train.init_adapter"] = str(champion.run_dir / "finetune" / "adapter")
    if recipe.retrain.epochs is not None:
        fields["train.epochs"] = recipe.retrain.epochs
    if recipe.retrain.lr is not None:
        fields["train.lr"] = recipe.retrain.lr
    raw = recipe.model_dump(mode="json")
    for dotted, value in fields.items():
        *sections, key = dotted.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[key] = value
    return validate_recipe(raw, source=f"{recipe.name} round {n}")


def compare_round(
    recipe: Recipe, champion: ServedVersion, candidate: ServedVersion, run_dir: Path, held_back: list[dict]
) -> dict:
    ids, a, b = compare.frozen_test_outcomes(champion.run_dir / "evaluate", run_dir / "evaluate")
    reps, seed = recipe.eval.bootstrap, recipe.eval.seed
    test = compare.paired(a, b, reps, seed)
    sliced = None
    if held_back:
        task_file = recipe.capture.task
        a_slice = slice_outcomes(champion.source, held_back, task_file, recipe, served_shape(champion))
        b_slice = slice_outcomes(candidate.source, held_back, task_file, recipe, served_shape(candidate))
        sliced = compare.paired(a_slice, b_slice, reps, seed)
    routing = {
        who: compare.Routing.from_report(v.run_dir / "evaluate")
        for who, v in (("champion", champion), ("candidate", candidate))
    }
    return compare.comparison(
        ids,
        test,
        sliced,
        routing["champion"],
        routing["candidate"],
        {"champion": champion.version, "candidate": candidate.version},
    )


def served_shape(version: ServedVersion) -> Shape:
    """What the router feeds this version: its evaluated policy's student_input, else its export's."""
    from pipeline.artifacts import read_manifest
    from pipeline.llm.policy import Policy

    if version.policy_path is not None:
        return Policy.load(version.policy_path).student_input
    manifest = read_manifest(version.source.parent)
    shape = (manifest.student_input if manifest is not None else None) or "user"
    return cast(Shape, shape)  # export writes a resolved shape; student_messages checks it again


def slice_outcomes(model_dir: Path, records: list[dict], task_file: Path, recipe: Recipe, shape: Shape) -> list[bool]:
    """Does the model, answering as served (`answer_as_served` on the conversation in the shape the
    router feeds it), agree with the teacher?"""
    from pipeline.conversation import student_messages
    from pipeline.llm.answer import Serving, answer_as_served
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.task import agrees, load_task

    task = load_task(task_file)
    model = load_model(str(model_dir), device_plan())
    tokenizer = load_tokenizer(str(model_dir))
    model.eval()
    conversations = [student_messages(r["messages"][:-1], shape) for r in records]
    answers = answer_as_served(model, tokenizer, conversations, Serving.of(recipe, task), source="loop (slice)")
    return [agrees(task, c.text, r["messages"][-1]["content"], recipe.router.fields) for c, r in zip(answers, records)]


def publish(
    recipe: Recipe,
    registry: Registry,
    name: str,
    candidate: ServedVersion,
    report: dict,
    summary: dict,
    out: Path,
    n: int,
) -> None:
    """The report on disk and in MLflow; the candidate tagged and aliased (promotion is a separate step)."""
    from pipeline.tracking import Tracker, resolve_uri

    atomic_write_json(out / COMPARE_JSON, {**report, "gathered": summary})
    atomic_write_text(out / COMPARE_MD, compare.render_markdown(report, summary))
    test = report["frozen_test"]
    registry.tag(
        name,
        candidate.version,
        {
            "round": n,
            VERDICT_TAG: report["verdict"],
            WORSE_TAG: str(report["significantly_worse"]).lower(),
            "compare.test_delta": f"{test['delta']['value']:+.4f}",
            "compare.test_delta_ci": f"[{test['delta']['lo']:+.4f}, {test['delta']['hi']:+.4f}]",
            "compare.why": report["why"][:500],
        },
    )
    registry.set_alias(name, CANDIDATE, candidate.version)
    tracker = Tracker(resolve_uri(recipe.tracking.uri), recipe.tracking.experiment)
    with tracker.run(f"{recipe.name}/r{n}/compare"):
        tracker.params(
            {
                "round": n,
                "champion_version": report["versions"]["champion"],
                "candidate_version": candidate.version,
                "verdict": report["verdict"],
            }
        )
        tracker.metrics(compare_metrics(report, summary))
        tracker.artifact(out / COMPARE_MD)
        tracker.artifact(out / COMPARE_JSON)
    log.info("retrain round %d: %s (%s); report %s", n, report["verdict"], report["why"], out / COMPARE_MD)


def compare_metrics(report: dict, summary: dict) -> dict[str, float]:
    metrics = {"examples_added": summary["added"], "escalated_slice": summary["escalated_slice"]}
    for key in ("frozen_test", "escalated_slice"):
        if report[key]:
            for who in ("champion", "candidate", "delta"):
                metrics[f"{key}_{who}_agreement" if who != "delta" else f"{key}_delta"] = report[key][who]["value"]
    for who, figures in report["routing"].items():
        metrics[f"{who}_local_share"] = figures["local_share"]
        if figures["routed_usd_per_1k"] is not None:
            metrics[f"{who}_routed_usd_per_1k"] = figures["routed_usd_per_1k"]
    return metrics


def round_table(rounds: Rounds) -> list[dict]:
    """Round-over-round figures from every finished round's evaluate and comparison."""
    rows = []
    n = 0
    while rounds.run_dir(n).is_dir() and rounds.done(n):
        report_path = rounds.run_dir(n) / "evaluate" / EVAL_REPORT
        if not report_path.is_file():
            break
        routing = compare.Routing.from_report(rounds.run_dir(n) / "evaluate")
        agree = list(compare.agreement_by_id(rounds.run_dir(n) / "evaluate").values())
        added = 0
        verdict = ""
        if n > 0:
            result = json.loads((rounds.run_dir(n) / "compare" / COMPARE_JSON).read_text())
            added, verdict = result["gathered"]["added"], result["verdict"]
        train = sum(1 for _ in iter_jsonl(rounds.run_dir(n) / "curate" / "train.jsonl"))
        rows.append(
            {
                "round": n,
                "train_examples": train,
                "examples_added": added,
                "test_agreement": sum(agree) / len(agree) if agree else None,
                "local_share": routing.local_share,
                "routed_agreement": routing.system_agreement,
                "routed_usd_per_1k": routing.routed_usd_per_1k,
                "verdict": verdict,
            }
        )
        n += 1
    return rows
