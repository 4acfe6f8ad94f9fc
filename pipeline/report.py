"""The end-of-run summary: what was captured and kept, before/after agreement, time, where things are."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipeline.config import Recipe
from pipeline.runner import PipelineResult


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ci(m: dict, name: str) -> str:
    """A figure with its 95% CI, as evaluate records it (name, name_lo, name_hi)."""
    if m.get(name) is None:
        return "—"
    if m.get(f"{name}_lo") is None:
        return _pct(m[name])
    return f"{_pct(m[name])} [{100 * m[f'{name}_lo']:.0f}-{100 * m[f'{name}_hi']:.0f}]"


def _usd(value: float | None) -> str:
    return "—" if value is None else f"${value:.4f}" if value < 1 else f"${value:.2f}"


def evaluate_rows(m: dict, spec: str | None = None) -> list[tuple[str, str]]:
    """Quality of base / tuned / teacher, the routed system at the threshold, and its cost."""
    rows = [("teacher agreement: base / tuned", f"{_ci(m, 'base_agreement')} / {_ci(m, 'tuned_agreement')}")]
    if "teacher_accuracy" in m:
        rows.append(
            (
                "gold accuracy: base / tuned / teacher",
                f"{_ci(m, 'base_accuracy')} / {_ci(m, 'tuned_accuracy')} / {_ci(m, 'teacher_accuracy')}",
            )
        )
    if "tuned_field_f1" in m:  # extraction
        rows.append(
            (
                "record exact match vs teacher: base / tuned",
                f"{_ci(m, 'base_exact_match')} / {_ci(m, 'tuned_exact_match')}",
            )
        )
        rows.append(("field F1 vs teacher: base / tuned", f"{_ci(m, 'base_field_f1')} / {_ci(m, 'tuned_field_f1')}"))
        if "teacher_gold_field_f1" in m:
            rows.append(
                (
                    "field F1 vs gold: tuned / teacher",
                    f"{_ci(m, 'tuned_gold_field_f1')} / {_ci(m, 'teacher_gold_field_f1')}",
                )
            )
    if "local_share" in m:
        rows.append(("routed: local share / agreement", f"{_ci(m, 'local_share')} / {_ci(m, 'system_agreement')}"))
    if "routed_usd_per_1k" in m:
        rows.append(
            (
                "$/1k requests: routed / teacher (measured)",
                f"{_usd(m['routed_usd_per_1k'])} / {_usd(m.get('teacher_only_usd_per_1k'))}",
            )
        )
    if spec and "priced_routed_usd_per_1k" in m:
        rows.append(
            (
                f"$/1k priced as {spec}: routed / API",
                f"{_usd(m['priced_routed_usd_per_1k'])} / {_usd(m['teacher_priced_usd_per_1k'])}",
            )
        )
        if m.get("priced_saving") is not None:
            rows.append(
                (
                    f"routing saves vs {spec}",
                    f"{_pct(m['priced_saving'])} [{100 * m['priced_saving_lo']:.0f}-{100 * m['priced_saving_hi']:.0f}]",
                )
            )
    return rows


def print_summary(recipe: Recipe, result: PipelineResult, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"distill: {recipe.name}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")

    capture = result.manifest("capture")
    curate = result.manifest("curate")
    evaluate = result.manifest("evaluate")
    if capture:
        c = capture.counts
        if result.skipped("capture"):  # nothing was asked or paid in this invocation
            table.add_row("prompts captured", f"{c['prompts']} (0 teacher calls: unchanged)")
            table.add_row("teacher cost (this run)", "$0.0000")
        else:
            table.add_row(
                "prompts captured", f"{c['prompts']} ({c['teacher_calls']} teacher calls, {c['cache_hits']} cached)"
            )
            table.add_row("teacher cost (this run)", f"${capture.cost_usd:.4f}")
    if curate:
        table.add_row(
            "examples kept",
            f"{curate.counts['kept']} (train {curate.counts['train']} / "
            f"val {curate.counts['validation']} / test {curate.counts['test']})",
        )
    if evaluate:
        for row in evaluate_rows(evaluate.metrics, recipe.eval.cost.teacher_priced_as):
            table.add_row(*row)
    for outcome in result.outcomes:
        took = "skipped (unchanged)" if outcome.skipped else f"{outcome.wall_s:.1f}s"
        table.add_row(f"time: {outcome.name}", took)
    console.print(table)
    console.print(f"artifacts: {result.run_dir}", soft_wrap=True)  # outside the table: long paths would wrap it
    console.print("next: [bold]make mlflow-ui[/bold] to browse the runs, [bold]make serve[/bold] to serve the student")


def print_rounds(rows: list[dict], console: Console | None = None) -> None:
    """The loop's round-over-round table (`distill retrain`)."""
    table = Table(title="Rounds (frozen test split; local share and cost at each round's own threshold)")
    for column in (
        "round",
        "train examples",
        "added",
        "student agrees with teacher",
        "local share",
        "routed agreement",
        "routed $ / 1k requests",
        "verdict",
    ):
        table.add_column(column)
    for r in rows:
        table.add_row(
            str(r["round"]),
            str(r["train_examples"]),
            str(r["examples_added"]),
            _pct(r["test_agreement"]),
            _pct(r["local_share"]),
            _pct(r["routed_agreement"]),
            _usd(r["routed_usd_per_1k"]),
            r["verdict"] or "champion (round 0)",
        )
    (console or Console()).print(table)


def _fig(f: dict | None) -> str:
    """A rate with its 95% CI ({value, lo, hi}), as the loop simulation records it."""
    if f is None:
        return "—"
    return f"{_pct(f['value'])} [{100 * f['lo']:.0f}-{100 * f['hi']:.0f}]"


def print_sim_rounds(result: dict, console: Console | None = None) -> None:
    """`distill loop-sim`'s table: each round's candidate on the frozen test split, and what it served."""
    priced = result.get("priced_as")
    table = Table(
        title=f"Loop simulation of {result['recipe']} (teacher: {result['teacher']}, a simulation; frozen test split)"
    )
    for column in (
        "round",
        "served local",
        "escalations",
        "added",
        "agrees with teacher",
        "accuracy",
        "local share",
        f"routed $ / 1k (priced as {priced})" if priced else "routed $ / 1k (unpriced)",
        "train s",
        "verdict",
    ):
        table.add_column(column)
    for r in result["rounds"]:
        served, cost = r["served"], r["routed_usd_per_1k_priced"]
        table.add_row(
            str(r["round"]),
            _fig(served["local_share"]) if served else "—",
            str(r["escalations_logged"]),
            str(r["examples_added"]),
            _fig(r["test_agreement"]),
            _fig(r["test_accuracy"]),
            _fig(r["local_share"]),
            _usd(cost["value"]) if cost else "—",
            "—" if r["train_s"] is None else f"{r['train_s']:.0f}",
            r["verdict"] + (" (promoted)" if r.get("promoted") else ""),
        )
    (console or Console()).print(table)
