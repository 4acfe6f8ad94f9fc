"""How far to trust a confidence signal: temperature scaling of the label posterior on
validation, the logistic signal's weights, AUROC for predicting "agrees with the teacher", and
reliability-diagram data.

    .venv/bin/pytest -q tests/evaluation/test_evaluate_threshold.py
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.llm.completion import Completion
from pipeline.task import parse_json, same_field


def fit_temperature(completions: list[Completion], targets: list[str | None]) -> float:
    """The posterior temperature minimising the negative log-likelihood of the teacher's label
    (temperature scaling, Guo et al. 2017). Rows without scores or a valid target are left out;
    with none left the posterior is used as it is (T = 1)."""
    from scipy.optimize import minimize_scalar

    rows = [(c.label_logprobs, t) for c, t in zip(completions, targets) if c.label_logprobs and t in c.label_logprobs]
    if not rows:
        return 1.0
    labels = list(rows[0][0])
    scores = np.array([[lp[label] for label in labels] for lp, _ in rows])
    target = np.array([labels.index(t) for _, t in rows])

    def nll(log_t: float) -> float:
        z = scores / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(target)), target].mean())

    found = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(found.x))


MIN_OUTCOMES = 2  # a field is fitted alone with at least this many right and this many wrong values


def fit_field_temperatures(completions: list[Completion], references: list[str]) -> dict[str, float]:
    """Per field, the temperature T for which p = exp(logprob / T) of its value best predicts "this
    field equals the teacher's" (negative log-likelihood, as the label posterior's temperature is
    fitted); "*" pools every field and stands in for a field with too few right or wrong values
    to fit alone. A logprob sums over a value's tokens, so a long value (a list, a name) has a low
    one even when right: a field's own T puts fields on one scale before the minimum is taken."""
    from scipy.optimize import minimize_scalar

    rows: dict[str, list[tuple[float, bool]]] = {}
    for c, reference in zip(completions, references):
        answer, ref = parse_json(c.text), parse_json(reference)
        if not c.field_logprobs or not isinstance(answer, dict) or not isinstance(ref, dict):
            continue
        for name, lp in c.field_logprobs.items():
            rows.setdefault(name, []).append((lp, same_field(answer, ref, name)))

    def fit(pairs: list[tuple[float, bool]]) -> float | None:
        right = sum(ok for _, ok in pairs)
        if right < MIN_OUTCOMES or len(pairs) - right < MIN_OUTCOMES:
            return None
        lp = np.array([x for x, _ in pairs])
        y = np.array([ok for _, ok in pairs], dtype=float)

        def nll(log_t: float) -> float:
            p = np.clip(np.exp(lp / math.exp(log_t)), 1e-6, 1 - 1e-6)
            return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

        return float(math.exp(minimize_scalar(nll, bounds=(math.log(0.05), math.log(50.0)), method="bounded").x))

    pooled = fit([pair for pairs in rows.values() for pair in pairs])
    temperatures = {"*": pooled or 1.0}
    for name, pairs in rows.items():
        fitted = fit(pairs)
        if fitted is not None:
            temperatures[name] = fitted
    return temperatures


def auroc(scores: list[float | None], agree: list[bool]) -> float | None:
    """Area under the ROC curve of the signal for "this answer agrees"; an answer without a
    signal ranks lowest (the router escalates it). None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    if len(set(agree)) < 2:
        return None
    known = [s for s in scores if s is not None]
    floor = (min(known) - 1.0) if known else 0.0
    return float(roc_auc_score(agree, [floor if s is None else s for s in scores]))


def reliability(probs: list[float | None], agree: list[bool], bins: int = 10) -> dict:
    """Per-bin mean confidence vs observed agreement, and the expected calibration error."""
    pairs = [(p, a) for p, a in zip(probs, agree) if p is not None]
    if not pairs:
        return {"bins": [], "ece": None}
    p = np.clip(np.array([x[0] for x in pairs], dtype=float), 0, 1)
    a = np.array([x[1] for x in pairs], dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            rows.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "confidence": float(p[mask].mean()),
                    "agreement": float(a[mask].mean()),
                    "n": int(mask.sum()),
                }
            )
            ece += mask.mean() * abs(p[mask].mean() - a[mask].mean())
    return {"bins": rows, "ece": float(ece)}


def fit_logistic(completions: list[Completion], agree: list[bool]) -> dict[str, float] | None:
    """Weights of the `logistic` router signal: P(agrees with the teacher) from the answer's token
    features (pipeline/llm/policy.py token_features), L2-regularised. None when the rows lack
    logprobs or all agree (or all disagree): nothing to learn a boundary from."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.llm.policy import token_features

    rows = [(f, ok) for f, ok in ((token_features(c), ok) for c, ok in zip(completions, agree)) if f is not None]
    if len({ok for _, ok in rows}) < 2:
        return None
    names = list(rows[0][0])
    x = np.array([[f[n] for n in names] for f, _ in rows])
    fit = LogisticRegression(C=1.0, max_iter=1000).fit(x, np.array([ok for _, ok in rows], dtype=int))
    return {"intercept": float(fit.intercept_[0]), **{n: float(w) for n, w in zip(names, fit.coef_[0])}}
