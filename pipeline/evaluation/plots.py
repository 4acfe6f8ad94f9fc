"""The evaluation's PNGs: confusion matrix, reliability diagram, risk-coverage and cost-quality.

    .venv/bin/pytest -q tests/evaluation/test_evaluate_stage.py

Headless (Agg backend, chosen per figure, never at import); each PNG is written atomically.
"""

from __future__ import annotations

from pathlib import Path

CONFUSION_PNG = "confusion.png"
RELIABILITY_PNG = "reliability.png"
RISK_COVERAGE_PNG = "risk_coverage.png"
COST_QUALITY_PNG = "cost_quality.png"


def _figure(size=(5.0, 4.0)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=size)


def save_png(plt, fig, path: Path) -> None:
    """Tight layout, then written to a temp file and renamed: never a half-written PNG."""
    import os
    import tempfile

    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)


def confusion_png(path: Path, axis: list[str], matrix: list[list[int]], title: str) -> None:
    plt, fig, ax = _figure((1.0 + 0.45 * len(axis), 0.8 + 0.4 * len(axis)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(axis)), axis, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(axis)), axis, fontsize=7)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_xlabel("tuned student")
    ax.set_ylabel("teacher")
    ax.set_title(title, fontsize=9)
    save_png(plt, fig, path)


def reliability_png(path: Path, bins: list[dict], signal_name: str, ece: float | None) -> None:
    plt, fig, ax = _figure()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    if bins:
        ax.plot([b["confidence"] for b in bins], [b["agreement"] for b in bins], marker="o", label=signal_name)
    ax.set_xlabel("confidence")
    ax.set_ylabel("observed agreement with the teacher")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability (test), ECE {ece:.3f}" if ece is not None else "reliability (test)", fontsize=9)
    ax.legend(fontsize=7)
    save_png(plt, fig, path)


def risk_coverage_png(
    path: Path, curves: dict[str, list[dict]], chosen: tuple[float, float] | None, target: float
) -> None:
    plt, fig, ax = _figure()
    for name, rows in curves.items():
        if rows:
            ax.plot([r["coverage"] for r in rows], [1 - r["agreement_answered"] for r in rows], label=name)
    ax.axhline(1 - target, ls="--", color="grey", lw=1, label=f"risk at target {target:.2f}")
    if chosen:
        ax.scatter([chosen[0]], [chosen[1]], color="red", zorder=3, label="chosen threshold (test)")
    ax.set_xlabel("coverage (share answered by the student)")
    ax.set_ylabel("risk (disagreement on answered)")
    ax.set_xlim(0, 1)
    ax.set_title("risk-coverage (test)", fontsize=9)
    ax.legend(fontsize=7)
    save_png(plt, fig, path)


def cost_quality_png(
    path: Path, points: list[tuple[float, float]], chosen: tuple[float, float] | None, teacher: tuple[float, float]
) -> None:
    """x: $ per 1,000 requests, y: system agreement with the teacher, one point per threshold."""
    plt, fig, ax = _figure()
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label="routed, by threshold")
    ax.scatter([teacher[0]], [teacher[1]], color="black", marker="s", zorder=3, label="teacher only")
    if chosen:
        ax.scatter([chosen[0]], [chosen[1]], color="red", zorder=3, label="chosen threshold")
    ax.set_xlabel("$ per 1,000 requests")
    ax.set_ylabel("system agreement with the teacher (test)")
    ax.set_title("cost-quality", fontsize=9)
    ax.legend(fontsize=7)
    save_png(plt, fig, path)


def plot_interval_bars(
    path: Path, names: list[str], figures: list[dict], highlight: list[bool], xlabel: str, ylabel: str, title: str
) -> None:
    """One bar per figure ({value, lo, hi}) with its 95% CI, the highlighted ones in green; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(figures) + 2), 3.6))
    values = [f["value"] for f in figures]
    errors = [[v - f["lo"] for v, f in zip(values, figures)], [f["hi"] - v for v, f in zip(values, figures)]]
    ax.bar(
        range(len(figures)), values, yerr=errors, color=["tab:green" if h else "tab:gray" for h in highlight], capsize=3
    )
    ax.set_xticks(range(len(figures)), names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    save_png(plt, fig, path)
