"""Uncertainty on every figure: bootstrap confidence intervals over prompts, and the
Clopper-Pearson bound the routing threshold is chosen on.

    .venv/bin/pytest -q tests/evaluation/test_evaluate_metrics.py

The bootstrap resamples *prompts* (rows), with a fixed seed, so a figure and its interval are
reproducible; the percentile interval is used because the figures are bounded rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Figure:
    """A headline number with its 95% bootstrap interval and the number of prompts behind it."""

    value: float
    lo: float
    hi: float
    n: int

    def to_json(self) -> dict:
        return asdict(self)

    def fmt(self, pct: bool = True) -> str:
        if pct:
            return f"{100 * self.value:.1f}% [{100 * self.lo:.1f}, {100 * self.hi:.1f}]"
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def resample_indices(n: int, reps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


def bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, reps: int = 1000, seed: int = 0, level: float = 0.95
) -> Figure:
    """`statistic(indices)` on the full set, and the percentile interval over `reps` resamples."""
    return bootstrap_rows(lambda rows: np.array([statistic(idx) for idx in rows], dtype=float), n, reps, seed, level)


def bootstrap_rows(
    statistic: Callable[[np.ndarray], np.ndarray], n: int, reps: int = 1000, seed: int = 0, level: float = 0.95
) -> Figure:
    """`bootstrap` for a statistic that takes every resample at once: [rows, n] indices -> [rows]
    values (NaN where undefined, left out of the interval)."""
    if n == 0:
        raise ValueError("bootstrap over an empty set")
    value = float(statistic(np.arange(n)[None, :])[0])
    draws = statistic(resample_indices(n, reps, seed))
    lo, hi = np.nanquantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Figure(value, float(lo), float(hi), n)


def mean_figure(values: Sequence[float] | np.ndarray, reps: int = 1000, seed: int = 0) -> Figure:
    """A rate (mean of 0/1 or of any per-prompt value), vectorised: the common case."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("a rate over an empty set")
    draws = arr[resample_indices(arr.size, reps, seed)].mean(axis=1)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return Figure(float(arr.mean()), float(lo), float(hi), int(arr.size))


def clopper_pearson_lower(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound on a binomial rate: P(true rate < bound) <= 1 - confidence."""
    from scipy.stats import beta

    if n == 0 or k == 0:
        return 0.0
    return float(beta.ppf(1 - confidence, k, n - k + 1))


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact interval on a binomial rate."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    a = 1 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def examples_needed(target: float, confidence: float = 0.95) -> int:
    """Fewest answered examples whose lower bound can reach `target` at all (every one agreeing):
    the bound with k = n is (1 - confidence) ** (1 / n)."""
    if target >= 1:
        return math.inf  # type: ignore[return-value]  # no finite sample proves 100%
    return math.ceil(math.log(1 - confidence) / math.log(target))
