"""The end-of-run summary: what was captured and kept, before/after agreement, time, where things are."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipeline.config import Recipe
from pipeline.runner import PipelineResult


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


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
            table.add_row("prompts captured", f"{c['prompts']} ({c['teacher_calls']} teacher calls, {c['cache_hits']} cached)")
            table.add_row("teacher cost (this run)", f"${capture.cost_usd:.4f}")
    if curate:
        table.add_row("examples kept", f"{curate.counts['kept']} (train {curate.counts['train']} / "
                      f"val {curate.counts['validation']} / test {curate.counts['test']})")
    if evaluate:
        m = evaluate.metrics
        table.add_row("agreement with teacher, base student", _pct(m.get("base_agreement")))
        table.add_row("agreement with teacher, tuned student", _pct(m.get("tuned_agreement")))
        if "teacher_accuracy" in m:
            table.add_row("gold accuracy: teacher / tuned student",
                          f"{_pct(m['teacher_accuracy'])} / {_pct(m['tuned_accuracy'])}")
    for outcome in result.outcomes:
        took = "skipped (unchanged)" if outcome.skipped else f"{outcome.wall_s:.1f}s"
        table.add_row(f"time: {outcome.name}", took)
    console.print(table)
    console.print(f"artifacts: {result.run_dir}", soft_wrap=True)  # outside the table: long paths would wrap it
    console.print("next: [bold]make mlflow-ui[/bold] to browse the runs, [bold]make serve[/bold] to serve the student")
