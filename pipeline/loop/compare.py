"""Candidate vs champion: the same prompts, paired, with the uncertainty stated.

Two slices. The frozen test split (every round is evaluated on the same ids; each round's
evaluate wrote its per-prompt agreement with the teacher in predictions.jsonl) and the
escalated slice (new prompts that made the champion escalate, held back from training, which
both models answer here exactly as served). On each: agreement with the teacher with a
bootstrap CI, the paired difference (candidate - champion, bootstrap over prompts) and an
exact McNemar test on the discordant pairs. Next to them: each model's local share and
routed $ per 1,000 requests at its own calibrated threshold (from its evaluate report).

The verdict: "keep" when the candidate is worse than the champion beyond the CI on the frozen
test split (its upper bound below 0: `distill promote` then refuses without --force), when
its local share at the quality target is lower (the router would send more traffic to the
teacher: it costs more, whatever else improved), or when it improves nothing; "promote" when
it is not worse, keeps at least the champion's local share and improves agreement (test or
escalated slice) or the local share.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import EVAL_REPORT, iter_jsonl
from pipeline.errors import DistillError
from pipeline.stats import Figure, mean_figure, resample_indices

PREDICTIONS = "predictions.jsonl"  # evaluate's per-prompt rows


@dataclass(frozen=True)
class Paired:
    """Two systems' 0/1 outcomes on the same prompts."""

    champion: Figure
    candidate: Figure
    delta: Figure  # candidate - champion
    champion_only: int  # prompts only the champion got right
    candidate_only: int
    mcnemar_p: float

    def to_json(self) -> dict:
        return asdict(self)  # the Figures become {value, lo, hi, n}


def paired(champion: list[bool], candidate: list[bool], reps: int = 1000, seed: int = 0) -> Paired:
    if len(champion) != len(candidate) or not champion:
        raise DistillError(f"paired comparison needs the same non-empty prompts ({len(champion)} vs {len(candidate)})")
    a, b = np.asarray(champion, dtype=float), np.asarray(candidate, dtype=float)
    diffs = (b - a)[resample_indices(a.size, reps, seed)].mean(axis=1)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    delta = Figure(float((b - a).mean()), float(lo), float(hi), int(a.size))
    champion_only, candidate_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    return Paired(
        mean_figure(a, reps, seed),
        mean_figure(b, reps, seed),
        delta,
        champion_only,
        candidate_only,
        mcnemar_exact(champion_only, candidate_only),
    )


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs at 1/2."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(min(b, c), b + c, 0.5).pvalue)


def frozen_test_outcomes(champion_eval: Path, candidate_eval: Path) -> tuple[list[str], list[bool], list[bool]]:
    """Per-prompt agreement of both evaluates, joined on prompt id; refused unless the ids match."""
    a, b = agreement_by_id(champion_eval), agreement_by_id(candidate_eval)
    if set(a) != set(b):
        raise DistillError(
            f"the test splits differ ({len(set(a) ^ set(b))} ids in one only): {champion_eval} and "
            f"{candidate_eval} were not evaluated on the same frozen test split"
        )
    ids = sorted(a)
    return ids, [a[i] for i in ids], [b[i] for i in ids]


def agreement_by_id(eval_dir: Path) -> dict[str, bool]:
    return {row["id"]: bool(row["tuned_agrees"]) for _, row in iter_jsonl(Path(eval_dir) / PREDICTIONS)}


@dataclass(frozen=True)
class Routing:
    """One model's router figures at its own threshold, on the frozen test split."""

    threshold: float | None
    local_share: float
    system_agreement: float
    routed_usd_per_1k: float | None

    @classmethod
    def from_report(cls, eval_dir: Path) -> Routing:
        report = json.loads((Path(eval_dir) / EVAL_REPORT).read_text())
        router, rows = report["router"], report.get("cost", {}).get("rows", [])
        routed = next((r["usd_per_1k"] for r in rows if r["system"] == "routed"), None)
        test = router["test"]
        return cls(router["threshold"], test["local_share"]["value"], test["system_agreement"]["value"], routed)


def verdict(test: Paired, sliced: Paired | None, champion: Routing, candidate: Routing) -> tuple[str, bool, str]:
    """(promote|keep, significantly worse, why)."""
    if test.delta.hi < 0:
        return (
            "keep",
            True,
            (
                f"worse on the frozen test split beyond the 95% CI "
                f"(delta {test.delta.value:+.3f} [{test.delta.lo:+.3f}, {test.delta.hi:+.3f}])"
            ),
        )
    if candidate.local_share < champion.local_share:
        return (
            "keep",
            False,
            (
                f"local share at the quality target fell {champion.local_share:.3f} -> "
                f"{candidate.local_share:.3f}: more traffic would go to the teacher"
            ),
        )
    gains = []
    if test.delta.value > 0:
        gains.append(f"test agreement {test.delta.value:+.3f}")
    if sliced is not None and sliced.delta.value > 0:
        gains.append(f"escalated-slice agreement {sliced.delta.value:+.3f}")
    if candidate.local_share > champion.local_share:
        gains.append(f"local share {champion.local_share:.3f} -> {candidate.local_share:.3f}")
    if not gains:
        return "keep", False, "not worse beyond the CI, but no better on any figure"
    return "promote", False, "not worse beyond the CI; better on " + ", ".join(gains)


def comparison(
    ids: list[str],
    test: Paired,
    sliced: Paired | None,
    champion: Routing,
    candidate: Routing,
    versions: dict[str, str | None],
) -> dict:
    decision, worse, why = verdict(test, sliced, champion, candidate)
    return {
        "verdict": decision,
        "significantly_worse": worse,
        "why": why,
        "versions": versions,
        "frozen_test": {"ids": len(ids), **test.to_json()},
        "escalated_slice": sliced.to_json() if sliced else None,
        "routing": {"champion": asdict(champion), "candidate": asdict(candidate)},
    }


def render_markdown(report: dict, gathered: dict) -> str:
    """The round's report: what it added, the paired figures, the verdict."""

    def pct(fig: dict) -> str:
        return f"{100 * fig['value']:.1f}% [{100 * fig['lo']:.1f}, {100 * fig['hi']:.1f}]"

    def pp(fig: dict) -> str:
        return f"{100 * fig['value']:+.1f} pp [{100 * fig['lo']:+.1f}, {100 * fig['hi']:+.1f}]"

    lines = [
        f"# Round {gathered['round']}: candidate vs champion",
        "",
        f"**{report['verdict'].upper()}**: {report['why']}.",
        "",
        f"Versions: champion {report['versions'].get('champion')}, candidate {report['versions'].get('candidate')}.",
        "",
        "| slice | prompts | champion | candidate | delta (paired) | McNemar p |",
        "|---|---|---|---|---|---|",
    ]
    for name, key in (("frozen test", "frozen_test"), ("escalated (held back)", "escalated_slice")):
        fig = report[key]
        if fig:
            lines.append(
                f"| {name} | {fig['delta']['n']} | {pct(fig['champion'])} | {pct(fig['candidate'])} | "
                f"{pp(fig['delta'])} | {fig['mcnemar_p']:.3f} |"
            )
    champ, cand = report["routing"]["champion"], report["routing"]["candidate"]
    lines += [
        "",
        "| at its own threshold | champion | candidate |",
        "|---|---|---|",
        f"| threshold | {champ['threshold']} | {cand['threshold']} |",
        f"| local share (test) | {champ['local_share']:.3f} | {cand['local_share']:.3f} |",
        f"| routed system's agreement (test) | {champ['system_agreement']:.3f} | {cand['system_agreement']:.3f} |",
        f"| routed $ / 1,000 requests | {_usd(champ['routed_usd_per_1k'])} | {_usd(cand['routed_usd_per_1k'])} |",
        "",
        "## What the round added",
        "",
        f"{gathered['added']} new training records ({gathered['pool']} in all), {gathered['escalated_slice']} "
        f"escalations held back as the escalated slice; skipped: {gathered['skipped'] or 'none'}.",
        "",
        "| answer (teacher) | added |",
        "|---|---|",
    ]
    lines += [f"| {label} | {n} |" for label, n in gathered["added_by_label"].items()]
    lines += ["", "| why the champion escalated | records |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in gathered["added_by_reason"].items()]
    return "\n".join(lines) + "\n"


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:.4f}"
