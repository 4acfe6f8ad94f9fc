"""The sweep's plan and results: `key=v1,v2` overrides parsed into axes, their cartesian product
into trials (every trial's recipe validated before anything runs), and what each trial scored."""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.artifacts import sha256_json
from pipeline.config import Recipe, load_recipe
from pipeline.errors import DistillError

RESULTS_MD, RESULTS_JSON, RESULTS_PNG = "results.md", "results.json", "results.png"


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
    return [
        tuple(f"{a.key}={v}" for a, v in zip(axes, combo)) for combo in itertools.product(*(a.values for a in axes))
    ]


def trial_name(overrides: tuple[str, ...], axes: list[Axis]) -> str:
    """A folder name from the values that vary: stable across reruns and readable."""
    varying = {a.key for a in axes if len(a.values) > 1}
    shown = [o for o in overrides if o.partition("=")[0] in varying] or ["base"]
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", "__".join(shown))
    return name if len(name) <= 96 else f"{name[:80]}-{sha256_json(overrides)[:12]}"


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


@dataclass
class SweepOutcome:
    plan: SweepPlan
    parent_run_id: str
    results: list[TrialResult]  # every trial scored under the parent so far, grid order
    ran: list[str]  # trials trained or scored by this invocation
    winner: TrialResult | None
