"""The quality gate: named conditions `figure: bar` (eval.gate); a miss fails the stage.

.venv/bin/pytest -q tests/evaluation/test_evaluate_metrics.py -k gate
"""

from __future__ import annotations

from pipeline.errors import DistillError
from pipeline.stats import Figure


def check_gate(figures: dict[str, Figure], gate: dict[str, float]) -> None:
    """Raise naming every figure below its bar, with its value and 95% CI; an unknown name is an
    error too (a typo must not pass a gate silently)."""
    unknown = sorted(set(gate) - set(figures))
    if unknown:
        raise DistillError(
            f"evaluate: eval.gate names {', '.join(unknown)}, not measured on this run; "
            f"measured: {', '.join(sorted(figures))}"
        )
    misses = [
        f"{name} = {figures[name].value:.3f} (95% CI {figures[name].lo:.3f}-{figures[name].hi:.3f}) "
        f"is below the bar {bar}"
        for name, bar in gate.items()
        if figures[name].value < bar
    ]
    if misses:
        raise DistillError("evaluate: quality gate failed: " + "; ".join(misses))
