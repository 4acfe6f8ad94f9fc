"""How should a round learn from what it escalated? Retraining strategies compared on one round.

    .venv/bin/python bench/loop_strategies.py [RECIPE] [--round 1] [--variants warm,scratch,...]

Every variant starts from the same champion (round N-1 of `bench/loop_sim.py`'s rounds) and the same
escalations (that round's `rounds/r<N>-escalations.jsonl`); only `retrain.*` differs. Each is gathered,
curated, trained, evaluated and exported (merged, unregistered) in runs/<recipe>/rounds/strategies/<name>,
so an interrupted comparison resumes. The loop's own round (`warm`, when its settings match the round
that ran) is read from rounds/r<N> instead of being trained again.

Per variant: validation agreement (what picks the winner), frozen-test accuracy and agreement with CIs,
the paired change against the champion, the local share at the quality target and routed $ per 1,000,
and agreement on every held-back escalation of the rounds (escalated slices r1..r3: prompts no variant
trained on). One more row keeps the champion's threshold instead of recalibrating the candidate's on
the frozen validation split. Writes bench/results/loop_strategies.json (bench/results-quick/ with --quick).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import harness

from pipeline.errors import DistillError
from pipeline.loop.retrain import Rounds

# Every knob explicit, so a recipe's own retrain: section does not leak into the comparison.
PLAIN = {"retrain.escalation_weight": 1, "retrain.replay": 1.0}
LOOP_SETTINGS = {"retrain.warm_start": True, "retrain.epochs": 1, "retrain.lr": 3e-4, **PLAIN}
VARIANTS: dict[str, dict] = {
    # the loop's own setting (bench/results/loop_sim.json): warm start, 1 epoch at 3e-4, escalations appended
    "warm": LOOP_SETTINGS,
    # from scratch on the grown pool: the base model at banking77-cpu's train.epochs and train.lr
    "scratch": {"retrain.warm_start": False, "retrain.epochs": 4, "retrain.lr": 1e-3, **PLAIN},
    # warm, each escalation trained on 4 times per epoch
    "warm_weight4": {**LOOP_SETTINGS, "retrain.escalation_weight": 4},
    # warm, escalations plus a quarter of the old data (replay 0.25), 2 epochs
    "warm_replay25": {**LOOP_SETTINGS, "retrain.replay": 0.25, "retrain.epochs": 2},
}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from pipeline.cli import configure_logging
    from pipeline.config import load_recipe

    configure_logging()
    ref = args.recipe
    recipe = load_recipe(ref, [])
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise DistillError(f"unknown variant {unknown[0]}; have {', '.join(VARIANTS)}")
    rows = [run_variant(ref, recipe, args.runs_dir, args.round, name) for name in names]
    result = {
        "recipe": recipe.name,
        "round": args.round,
        "champion": f"round {args.round - 1}",
        "escalations": str(_escalations(recipe, args.runs_dir, args.round)),
        "held_back_escalations": len(_held_back(recipe, args.runs_dir)),
        "variants": rows,
        "winner_on_validation": max(rows, key=lambda r: r["validation_agreement"])["variant"],
    }
    harness.write("loop_strategies", result, args)
    return 0


@dataclass(frozen=True)
class Variant:
    name: str
    run_dir: Path
    reused: bool  # the loop's own round, read as it is


def run_variant(ref: str, recipe, runs_root: Path, n: int, name: str) -> dict:
    from pipeline.config import load_recipe

    variant_recipe = load_recipe(ref, [f"{k}={v}" for k, v in VARIANTS[name].items()])
    start = time.perf_counter()
    variant = train_variant(variant_recipe, runs_root, n, name)
    return measure(variant_recipe, runs_root, n, variant) | {
        "variant": name,
        "settings": VARIANTS[name],
        "reused_loop_round": variant.reused,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def train_variant(recipe, runs_root: Path, n: int, name: str) -> Variant:
    from pipeline.loop.retrain import freeze, gather_round, round_recipe_for
    from pipeline.registry import ServedVersion
    from pipeline.runner import run_pipeline

    rounds = Rounds(runs_root / recipe.name)
    if name == "warm" and _same_settings(rounds.run_dir(n), recipe):
        return Variant(name, rounds.run_dir(n), reused=True)
    where = VariantRounds(rounds.base, name, n)
    frozen = freeze(rounds)
    gather_round(recipe, where, n, frozen, [_escalations(recipe, runs_root, n)])
    champion = ServedVersion(recipe.name, "champion", rounds.run_dir(n - 1) / "export" / "merged")
    round_recipe = round_recipe_for(recipe, where, n, frozen, champion)
    unregistered = round_recipe.model_copy(
        update={"export": round_recipe.export.model_copy(update={"registry": False, "formats": ["merged"]})}
    )
    run_pipeline(unregistered, runs_root=where.run_dir(n).parent, run_name=name)
    return Variant(name, where.run_dir(n), reused=False)


@dataclass(frozen=True)
class VariantRounds(Rounds):
    """The loop's rounds, except round `n`: this variant's folder."""

    name: str = ""
    n: int = 1

    def run_dir(self, k: int) -> Path:
        return self.root / "strategies" / self.name if k == self.n else super().run_dir(k)


def _same_settings(run_dir: Path, recipe) -> bool:
    """Did the loop's round train with this variant's settings (its finetune's resolved config)?"""
    import yaml

    path = run_dir / "finetune" / "resolved_config.yaml"
    if not path.is_file():
        return False
    train = yaml.safe_load(path.read_text())["train"]
    retrain = recipe.retrain
    return (
        train.get("init_adapter") is not None
        and train["epochs"] == retrain.epochs
        and train["lr"] == retrain.lr
        and retrain.escalation_weight == 1
        and retrain.replay == 1.0
    )


def measure(recipe, runs_root: Path, n: int, variant: Variant) -> dict:
    from pipeline.artifacts import EVAL_REPORT
    from pipeline.loop import compare
    from pipeline.loop.retrain import slice_outcomes

    champion_dir = Rounds(runs_root / recipe.name).run_dir(n - 1)
    report = json.loads((variant.run_dir / "evaluate" / EVAL_REPORT).read_text())
    finetune = json.loads((variant.run_dir / "finetune" / "manifest.json").read_text())
    _, a, b = compare.frozen_test_outcomes(champion_dir / "evaluate", variant.run_dir / "evaluate")
    held = _held_back(recipe, runs_root)
    shape = report["router"]["student_input"]
    a_held = slice_outcomes(champion_dir / "export" / "merged", held, recipe.capture.task, recipe, shape)
    b_held = slice_outcomes(variant.run_dir / "export" / "merged", held, recipe.capture.task, recipe, shape)
    routing = compare.Routing.from_report(variant.run_dir / "evaluate")
    figures = report["figures"]
    return {
        "train_examples": finetune["counts"]["train_examples"],
        "train_wall_s": round(finetune["metrics"]["train_wall_s"], 1),
        "validation_agreement": figures["tuned_validation_agreement"]["value"],
        "test_accuracy": figures["tuned_accuracy"],
        "test_agreement": figures["tuned_agreement"],
        "test_vs_champion": compare.paired(a, b, recipe.eval.bootstrap, recipe.eval.seed).to_json(),
        "held_back_vs_champion": compare.paired(a_held, b_held, recipe.eval.bootstrap, recipe.eval.seed).to_json(),
        "threshold": routing.threshold,
        "local_share": report["router"]["test"]["local_share"],
        "routed_usd_per_1k": routing.routed_usd_per_1k,
        "at_champion_threshold": at_threshold(
            variant.run_dir / "evaluate", compare.Routing.from_report(champion_dir / "evaluate").threshold
        ),
    }


def at_threshold(eval_dir: Path, threshold: float | None) -> dict | None:
    """The candidate's frozen-test routing had it kept the champion's threshold instead of calibrating
    its own on validation (no guarantee then: the threshold was chosen for another model)."""
    from pipeline.artifacts import iter_jsonl
    from pipeline.loop import compare

    if threshold is None:
        return None
    agree = compare.agreement_by_id(eval_dir)
    confidence = {row["id"]: row["tuned_confidence"] for _, row in iter_jsonl(eval_dir / compare.PREDICTIONS)}
    local = [confidence[i] >= threshold for i in agree]
    return {
        "threshold": threshold,
        "local_share": sum(local) / len(local),
        "system_agreement": sum(agree[i] or not keep for i, keep in zip(agree, local)) / len(local),
    }


def _escalations(recipe, runs_root: Path, n: int) -> Path:
    path = runs_root / recipe.name / "rounds" / f"r{n}-escalations.jsonl"
    if not path.is_file():
        raise DistillError(f"{path}: no escalations for round {n}; run bench/loop_sim.py first")
    return path


def _held_back(recipe, runs_root: Path) -> list[dict]:
    """Every round's escalated slice: escalations the loop held back from training in every round."""
    from pipeline.artifacts import read_jsonl
    from pipeline.loop.retrain import SLICE

    slices = sorted((runs_root / recipe.name / "rounds").glob(f"r[0-9]*/gather/{SLICE}"))
    return [r for path in slices for r in read_jsonl(path)]


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/loop_strategies.py", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="banking77-cpu", help="A recipe name or path.")
    parser.add_argument("--round", type=int, default=1, help="The round whose escalations every variant trains on.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated: {', '.join(VARIANTS)}.")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="Where run folders go.")
    harness.add_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    harness.exit_with(main)
