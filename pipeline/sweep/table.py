"""The sweep's comparison table: results.md and the console table."""

from __future__ import annotations

from pipeline.sweep.plan import RESULTS_MD, SweepOutcome, SweepPlan, TrialResult


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
        rows.append(
            [
                str(trial.index + 1),
                *values,
                _pct(r.score),
                str(r.score["n"]),
                "—" if share is None else f"{100 * share:.1f}%",
                "—" if loss is None else f"{loss:.4f}",
                "winner" if winner is not None and r.name == winner.name else "",
            ]
        )
    return rows


def table_header(plan: SweepPlan) -> list[str]:
    return ["#", *plan.varying, "validation agreement [95% CI]", "n", "local share (val.)", "train loss", ""]


def results_markdown(
    plan: SweepPlan, outcome_rows: list[list[str]], winner: TrialResult | None, parent_id: str, n_scored: int
) -> str:
    header = table_header(plan)
    lines = [
        f"# Sweep {plan.folder.name}: {plan.base.name}",
        "",
        f"Chosen on agreement with the teacher on the validation split (never test); ties go to the earlier "
        f"trial. {n_scored}/{len(plan.trials)} trials scored. MLflow parent run `{parent_id}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in outcome_rows]
    if winner is not None:
        lines += [
            "",
            f"Winner: `{' '.join(winner.overrides)}` (child run `{winner.run_id}`, "
            f"folder `{plan.folder / winner.name}`).",
        ]
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
        console.print(
            f"winner: {' '.join(outcome.winner.overrides)}  ({plan.folder / outcome.winner.name})", soft_wrap=True
        )
    missing = len(plan.trials) - len(outcome.results)
    if missing:
        console.print(
            f"{missing} of {len(plan.trials)} trials not scored yet (other --shard processes, or rerun "
            "the same command): the winner is among the scored ones only"
        )
    console.print(
        f"table and plot: {plan.folder / RESULTS_MD}, MLflow parent run {outcome.parent_run_id}", soft_wrap=True
    )
