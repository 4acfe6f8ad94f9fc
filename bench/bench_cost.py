"""Cost: $ per 1,000 requests, teacher-only vs routed vs student-only, from an evaluate report.

    .venv/bin/python bench/bench_cost.py [--report runs/smollm2-135m-cpu/evaluate/report.json] [--quick]

Nothing is timed here: the evaluate stage measured the student's generation time and priced
the teacher (pipeline/evaluation/cost.py), and this reads its report's `cost` section. The
price assumptions travel with the figures: the teacher's price source (the captured
meta.cost_usd, i.e. the ledger's tokens x price, or, for a local in-process teacher, its
measured latency x eval.cost.student_usd_per_hour), the student's $/hour, and the requests/s
the student measured. The result names the report it read (path, sha256, its evaluate
manifest's fingerprint and created_at, the recipe name). Routed = the student on every request
+ the teacher on the escalated share at the chosen threshold (the test split's local share).

Without a report (a fresh clone has no runs/) it says so on stderr and exits 0, writing
nothing, so the committed bench/results/cost.json stays. --quick changes nothing (it is cheap)
except where the result goes (bench/harness.py).
Writes bench/results/cost.json (bench/harness.py: envelope and figures).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402

DEFAULT_REPORT = ROOT / "runs" / "smollm2-135m-cpu" / "evaluate" / "report.json"
ROWS = {"teacher only": "teacher_only", "routed": "routed", "student only": "student_only"}


class ReportError(ValueError):
    """The report exists but lacks what the cost figures need."""


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def source(report: Path) -> dict:
    """Which report: its path and hash, and what its folder says about it (manifest, recipe)."""
    digest = hashlib.sha256(report.read_bytes()).hexdigest()
    folder = report.parent
    manifest = None
    if (folder / "manifest.json").is_file():
        m = json.loads((folder / "manifest.json").read_text())
        manifest = {
            "fingerprint": m.get("fingerprint"),
            "created_at": m.get("created_at"),
            "inputs": m.get("inputs"),
            "report_sha256": (m.get("outputs") or {}).get(report.name),
        }
    recipe = teacher = None
    if (folder / "resolved_config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((folder / "resolved_config.yaml").read_text()) or {}
        recipe = cfg.get("name")
        teacher = (cfg.get("teacher") or {}).get("spec")
    return {
        "report": _rel(report),
        "report_sha256": digest,
        "manifest": manifest,
        # False: the report was changed after its stage wrote it (the manifest hashes what it wrote).
        "report_matches_manifest": None
        if manifest is None or manifest["report_sha256"] is None
        else manifest["report_sha256"] == digest,
        "recipe": recipe,
        "teacher_spec": teacher,
    }


def cost_result(report_data: dict, src: dict) -> dict:
    """The bench's result from a report's `cost` (and `router`) sections."""
    cost = report_data.get("cost")
    if not isinstance(cost, dict) or "rows" not in cost:
        raise ReportError(
            "the report has no `cost` section with `rows` (an evaluate report from before "
            "pipeline/evaluation/cost.py?); rerun the evaluate stage"
        )
    rows = {row["system"]: row for row in cost["rows"]}
    missing = sorted(set(ROWS) - set(rows))
    if missing:
        raise ReportError(f"the report's cost.rows lack {missing}")
    per_hour = cost["student_usd_per_hour"]
    rps = cost.get("student_requests_per_s")
    teacher_usd = cost["teacher_usd_per_request"]
    prices = {
        "teacher_basis": cost["teacher_basis"],
        "teacher_usd_per_request": teacher_usd,
        # Latency basis: the price is seconds x $/hour, so the seconds it assumed are recoverable.
        "teacher_s_per_request": teacher_usd / per_hour * 3600
        if cost["teacher_basis"] == "latency" and per_hour
        else None,
        "student_usd_per_hour": per_hour,
        "student_requests_per_s": rps,
        "student_s_per_request": 1 / rps if rps else None,
        "student_usd_per_request": cost["student_usd_per_request"],
    }
    router = report_data.get("router") or {}
    test = router.get("test") or {}
    share = test.get("local_share") or {}
    return {
        "source": src,
        "prices": prices,
        "usd_per_1k": {key: rows[system]["usd_per_1k"] for system, key in ROWS.items()},
        "saving_vs_teacher": {key: rows[system]["saving_vs_teacher"] for system, key in ROWS.items()},
        "local_share": {
            "value": rows["routed"]["local_share"],
            "lo": share.get("lo"),
            "hi": share.get("hi"),
            "n": share.get("n"),
            "split": "test",
        },
        "threshold": router.get("threshold"),
        "quality_target": router.get("quality_target"),
        "system_agreement": (test.get("system_agreement") or {}).get("value"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--report",
        type=Path,
        default=DEFAULT_REPORT,
        help="an evaluate stage's report.json (default: the demo recipe's run)",
    )
    harness.add_arguments(parser)
    args = parser.parse_args(argv)

    if not args.report.is_file():
        print(
            f"bench_cost: no evaluate report at {_rel(args.report)} (run `make distill` first, or pass "
            f"--report PATH): skipped, nothing written; the committed bench/results/cost.json stays",
            file=sys.stderr,
        )
        return 0
    try:
        result = cost_result(json.loads(args.report.read_text()), source(args.report))
    except (ReportError, json.JSONDecodeError) as e:
        print(f"bench_cost: {_rel(args.report)}: {e}", file=sys.stderr)
        return 1
    except KeyError as e:
        print(f"bench_cost: {_rel(args.report)}: the cost section lacks {e}; rerun the evaluate stage", file=sys.stderr)
        return 1
    harness.write("cost", result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
