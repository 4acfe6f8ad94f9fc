"""The bench harness: quick runs of the cheap benches write complete, sane JSON; the report renders it.

Never asserts on a timing (these machines are shared): only that every field is there, numbers
are positive and finite, ratio = value / baseline, and every figure reaches RESULTS.md and the
docs' generated blocks. The benches run as `make bench` runs them, as scripts in a subprocess.
`report.py --check` also holds every figure in README.md and docs/*.md to its source.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import figure_lint  # noqa: E402
import figures  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "trl", "llama-cpp-python")
FIGURE_KEYS = {"name", "value", "unit", "better", "baseline", "baseline_name", "ratio", "headline", "note"}


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def assert_figures_sane(figs: list[dict]) -> None:
    assert figs
    for f in figs:
        assert set(f) == FIGURE_KEYS, f
        assert isinstance(f["name"], str) and f["name"]
        assert isinstance(f["value"], (int, float)) and math.isfinite(f["value"]) and f["value"] > 0, f
        assert f["better"] in ("higher", "lower", "closer to 1x"), f
        assert isinstance(f["headline"], bool)
        if f["baseline"] is None:
            assert f["ratio"] is None and f["baseline_name"] is None, f
        else:
            assert f["baseline"] > 0 and f["baseline_name"], f
            assert f["ratio"] == pytest.approx(f["value"] / f["baseline"]), f
    assert len({f["name"] for f in figs}) == len(figs), "figure names must be unique within a bench"


def assert_envelope_complete(env: dict, script: str, *, instant: bool = False) -> None:
    """instant: a bench that only reads a file (cost) may round its wall time to 0.0 s."""
    assert env["quick"] is True
    assert script in env["command"] and "--quick" in env["command"]
    assert (env["wall_s"] >= 0 if instant else env["wall_s"] > 0) and env["started_at"]
    for when in ("start", "end"):
        load = env["load_average"][when]
        assert len(load) == 3 and all(isinstance(v, float) and v >= 0 for v in load)
    m = env["machine"]
    assert m["cores"] > 0 and m["arch"] and m["cpu"]
    assert isinstance(m["affinity"], list) and 0 < len(m["affinity"]) <= m["cores"]
    assert m["pinned"] == (len(m["affinity"]) < m["cores"])
    for package in PACKAGES:
        assert isinstance(env["versions"][package], str) and env["versions"][package]
    assert env["versions"]["torch"] != "not installed"
    assert set(env["git"]) == {"commit", "dirty"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    """The two cheapest benches in quick mode: curate on TF-IDF, and the router's null-backend arm."""
    out = tmp_path_factory.mktemp("bench-results")
    run_bench("bench_curate.py", "--quick", "--embeddings", "tfidf", "--out-dir", str(out))
    run_bench("bench_router.py", "--quick", "--arms", "layer", "--out-dir", str(out))
    return out


def test_quick_benches_write_every_envelope_field_and_sane_figures(quick_results):
    assert sorted(p.name for p in quick_results.iterdir()) == ["curate.json", "router.json"]
    for name, script in (("curate", "bench_curate.py"), ("router", "bench_router.py")):
        data = json.loads((quick_results / f"{name}.json").read_text())
        assert_envelope_complete(data["envelope"], script)
        assert_figures_sane(data["figures"])
        # What the script stored is what the extractor makes of its result: one definition of a figure.
        assert data["figures"] == figures.figures_for(name, data)
    curate = json.loads((quick_results / "curate.json").read_text())
    assert curate["records"] == 500 and set(curate["arms"]) == {"tfidf"}
    assert curate["arms"]["tfidf"]["counts"]["input"] == 500
    router = json.loads((quick_results / "router.json").read_text())
    names = {f["name"] for f in router["figures"]}
    assert {
        "router layer, concurrency 1: router_null_backend p50",
        "router layer, concurrency 4: router_null_backend p99",
    } <= names
    assert all(f["baseline_name"] == "bare_uvicorn" for f in router["figures"])


def test_quick_serving_bench_measures_each_artifact_kind(tmp_path):
    # No export in quick mode: the embedded model's safetensors as "merged" and its shipped GGUF.
    run_bench("bench_serving.py", "--quick", "--out-dir", str(tmp_path))
    data = json.loads((tmp_path / "serving.json").read_text())
    assert_envelope_complete(data["envelope"], "bench_serving.py")
    assert_figures_sane(data["figures"])
    assert data["figures"] == figures.figures_for("serving", data)
    assert set(data["arms"]) == {"merged (transformers)", "embedded-q4_1 (llama.cpp)"}
    assert data["prompts"] == 2 and data["tokens_per_prompt"] == 4 and "embedded" in data["source"]
    batched = [f for f in data["figures"] if f["name"].endswith("tokens/s, batch 8")]
    assert len(batched) == 1 and batched[0]["baseline_name"] == "batch 1"


def test_quick_runs_default_to_the_ignored_folder(monkeypatch):
    import argparse

    monkeypatch.setenv("BENCH_QUICK", "1")
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args([])
    assert args.quick and harness.out_path(args, "curate") == BENCH / "results-quick" / "curate.json"
    monkeypatch.setenv("BENCH_QUICK", "0")
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args([])
    assert not args.quick and harness.out_path(args, "curate") == BENCH / "results" / "curate.json"
    assert "results-quick/" in (BENCH / ".gitignore").read_text().split()


def section(text: str, start: str, end: str) -> list[str]:
    return text.split(start, 1)[1].split(end, 1)[0].splitlines()


def rendered_figures_present(text: str, docs: list[tuple[str, dict]], where: str = "results") -> None:
    """Each figure's row shows its value, baseline and ratio: in its bench's section of RESULTS.md
    (where="results"), in RESULTS.md's headline table (headline figures only, where="headline"),
    or in a doc's generated block for its bench (where="block")."""
    for name, data in docs:
        if where == "headline":
            lines = [line for line in section(text, "## Headline figures", "\n## ") if line.startswith(f"| {name} |")]
        elif where == "block":
            lines = section(text, f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->")
        else:
            lines = section(text, f"\n## {name}:", "\n## ")
        for f in report.figures_of(name, data):
            if where == "headline" and not f["headline"]:
                continue
            row = [line for line in lines if f"| {f['name']} |" in line]
            assert len(row) == 1, f"{name}: {f['name']} missing or repeated"
            assert f"| {report.format_value(f)} |" in row[0], (f, row[0])
            assert f"| {report.format_ratio(f)} |" in row[0], (f, row[0])
            if f["baseline"] is not None:
                assert report.format_baseline(f) in row[0]


def test_report_renders_every_figure_of_fresh_and_committed_results(quick_results, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)  # committed: loop_demo.json has no envelope
    for p in quick_results.glob("*.json"):
        shutil.copy(p, results / f"quick_{p.name}")  # unknown names: the generic extractor
    shutil.copy(quick_results / "curate.json", results / "curate.json")  # a fresh one with an envelope
    readme = tmp_path / "README.md"
    readme.write_text("# X\n\nabove\n\n<!-- bench:router:start -->\nold table\n<!-- bench:router:end -->\n\nbelow\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n<!-- bench:curate:start -->\n<!-- bench:curate:end -->\n\n"
        "<!-- bench:quick_router:start -->\n<!-- bench:quick_router:end -->\n"
    )

    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    docs = report.load(results)
    assert {name for name, _ in docs} >= {
        "curate",
        "finetune",
        "capture",
        "local_teacher",
        "router",
        "loop_demo",
        "teacher_prompt",
        "quick_router",
    }
    rendered_figures_present(text, docs)
    rendered_figures_present(text, docs, where="headline")
    for name, _ in docs:
        assert f"## {name}:" in text
    assert report.NOT_RECORDED in text  # the committed JSON without an envelope
    assert "**quick run**" in text
    fresh = json.loads((results / "curate.json").read_text())["envelope"]
    assert fresh["command"] in text and fresh["versions"]["transformers"] in text

    body = readme.read_text()
    assert body.startswith("# X\n\nabove\n\n") and body.endswith("\n\nbelow\n") and "old table" not in body
    by_name = dict(docs)
    rendered_figures_present(body, [("router", by_name["router"])], where="block")
    assert "[RESULTS.md](RESULTS.md)" in body  # the link is relative to the page
    page_text = page.read_text()
    rendered_figures_present(page_text, [(n, by_name[n]) for n in ("curate", "quick_router")], where="block")
    assert "[RESULTS.md](../RESULTS.md)" in page_text
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    page.write_text(page_text.replace("| curate, tfidf", "| typed by hand", 1))
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1


def test_committed_results_docs_blocks_and_figures_pass_the_check(capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().out + "\nrun: .venv/bin/python bench/report.py"


def test_ratio_is_value_over_baseline_for_every_committed_figure():
    for name, data in report.load(BENCH / "results"):
        assert_figures_sane(report.figures_of(name, data))


def test_bench_gpu_skips_cleanly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: make bench-gpu would run the GPU tier")
    proc = run_bench("bench_gpu.py", "--out-dir", str(tmp_path))
    assert "skipped" in proc.stdout and not list(tmp_path.iterdir())


def synthetic_evaluate_run(folder: Path, *, basis: str = "latency") -> Path:
    """An evaluate folder as the stage writes it: report.json (cost + router), manifest, resolved config."""
    folder.mkdir(parents=True)
    teacher_usd, student_usd, share = 2e-05, 5e-06, 0.75
    rows = [
        {"system": "teacher only", "usd_per_1k": 1000 * teacher_usd, "local_share": 0.0, "saving_vs_teacher": 0.0},
        {
            "system": "routed",
            "usd_per_1k": 1000 * (student_usd + (1 - share) * teacher_usd),
            "local_share": share,
            "saving_vs_teacher": 0.5,
        },
        {"system": "student only", "usd_per_1k": 1000 * student_usd, "local_share": 1.0, "saving_vs_teacher": 0.75},
    ]
    report = {
        "cost": {
            "teacher_usd_per_request": teacher_usd,
            "teacher_basis": basis,
            "student_usd_per_request": student_usd,
            "student_usd_per_hour": 0.36,
            "student_requests_per_s": 20.0,
            "rows": rows,
            "curve": [[0.03, 1.0]],
        },
        "router": {
            "threshold": 0.5,
            "quality_target": 0.9,
            "test": {
                "local_share": {"value": share, "lo": 0.7, "hi": 0.8, "n": 200},
                "system_agreement": {"value": 0.93},
            },
        },
    }
    text = json.dumps(report)
    (folder / "report.json").write_text(text)
    import hashlib

    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "stage": "evaluate",
                "fingerprint": "f" * 64,
                "created_at": "2026-01-02T03:04:05+00:00",
                "inputs": {"capture": "c" * 64},
                "outputs": {"report.json": hashlib.sha256(text.encode()).hexdigest()},
            }
        )
    )
    (folder / "resolved_config.yaml").write_text("name: synthetic-recipe\nteacher:\n  spec: local:tiny\n")
    return folder / "report.json"


@pytest.mark.parametrize("basis", ["latency", "ledger"])
def test_cost_bench_reads_an_evaluate_report_and_states_its_prices(tmp_path, basis):
    report_path = synthetic_evaluate_run(tmp_path / "run" / "evaluate", basis=basis)
    out = tmp_path / "results"
    run_bench("bench_cost.py", "--quick", "--report", str(report_path), "--out-dir", str(out))
    data = json.loads((out / "cost.json").read_text())
    assert_envelope_complete(data["envelope"], "bench_cost.py", instant=True)
    assert_figures_sane(data["figures"])
    assert data["figures"] == figures.figures_for("cost", data)

    src = data["source"]
    assert src["report"] == str(report_path) and len(src["report_sha256"]) == 64
    assert src["manifest"]["fingerprint"] == "f" * 64
    assert src["manifest"]["created_at"] == "2026-01-02T03:04:05+00:00"
    assert src["report_matches_manifest"] is True
    assert src["recipe"] == "synthetic-recipe" and src["teacher_spec"] == "local:tiny"
    assert data["usd_per_1k"] == pytest.approx({"teacher_only": 0.02, "routed": 0.01, "student_only": 0.005})
    p = data["prices"]
    assert p["teacher_basis"] == basis and p["student_usd_per_hour"] == 0.36
    assert p["student_requests_per_s"] == 20.0 and p["student_s_per_request"] == pytest.approx(0.05)
    # Latency basis: $2e-05 at $0.36/h is 0.2 s of the machine; a ledger price has no seconds behind it.
    assert p["teacher_s_per_request"] == (pytest.approx(0.2) if basis == "latency" else None)

    by_name = {f["name"].split(":")[0]: f for f in data["figures"]}
    assert set(by_name) == {"cost, teacher only", "cost, routed", "cost, student only", "cost"}
    teacher, routed, student = by_name["cost, teacher only"], by_name["cost, routed"], by_name["cost, student only"]
    assert teacher["value"] == pytest.approx(0.02) and teacher["baseline"] is None
    for f, ratio in ((routed, 0.5), (student, 0.25)):
        assert f["baseline"] == teacher["value"] and f["baseline_name"] == "teacher only"
        assert f["ratio"] == pytest.approx(f["value"] / f["baseline"]) == pytest.approx(ratio)
        assert f["better"] == "lower" and f["unit"] == "$" and f["headline"]
    assert "synthetic-recipe" in routed["name"]
    # The price assumptions, next to each figure that rests on them.
    teacher_source = "0.2 s" if basis == "latency" else "meta.cost_usd"
    for f in (teacher, routed):
        assert "$2e-05/request" in f["note"] and teacher_source in f["note"]
    for f in (routed, student):
        assert "$5e-06/request" in f["note"] and "$0.36/h" in f["note"] and "20 requests/s" in f["note"]
    assert "25.0% escalated" in routed["note"]
    share = by_name["cost"]
    assert share["value"] == 0.75 and share["unit"] == "fraction" and "n=200" in share["note"]

    # The report prints the notes next to the figures, in RESULTS.md and in a doc's block.
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:cost:start -->\n<!-- bench:cost:end -->\n")
    assert report.main(["--results", str(out), "--readme", str(readme)]) == 0
    docs = report.load(out)
    for text, where in (((tmp_path / "RESULTS.md").read_text(), "results"), (readme.read_text(), "block")):
        rendered_figures_present(text, docs, where=where)
        for f in data["figures"]:
            row = next(line for line in text.splitlines() if f"| {f['name']} |" in line)
            assert f"| {f['note']} |" in row


def test_cost_bench_without_a_report_writes_nothing_and_exits_0(tmp_path):
    out = tmp_path / "results"
    for quick in ((), ("--quick",)):
        proc = run_bench(
            "bench_cost.py", *quick, "--report", str(tmp_path / "none" / "report.json"), "--out-dir", str(out)
        )
        assert "no evaluate report" in proc.stderr and "nothing written" in proc.stderr
        assert not out.exists() and "wrote" not in proc.stdout
    # The default destination too: the committed measurement stays as it is.
    committed = BENCH / "results" / "cost.json"
    before = (committed.read_bytes(), committed.stat().st_mtime_ns) if committed.exists() else None
    proc = run_bench("bench_cost.py", "--report", str(tmp_path / "none" / "report.json"))
    assert "nothing written" in proc.stderr
    assert before == ((committed.read_bytes(), committed.stat().st_mtime_ns) if committed.exists() else None)


def test_cost_bench_refuses_a_report_without_a_cost_section(tmp_path):
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps({"metrics": {}}))
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_cost.py"),
            "--report",
            str(report_path),
            "--out-dir",
            str(tmp_path / "results"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "no `cost` section" in proc.stderr
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------- figures in README.md and docs/


@pytest.fixture
def check_readme(tmp_path, capsys):
    """report.py --check on a README holding `text` next to the committed results: (exit code, output)."""
    shutil.copy(BENCH / "RESULTS.md", tmp_path / "RESULTS.md")  # current: the committed check says so

    def run(text: str) -> tuple[int, str]:
        (tmp_path / "README.md").write_text(text)
        capsys.readouterr()
        rc = report.main(["--readme", str(tmp_path / "README.md"), "--out", str(tmp_path / "RESULTS.md"), "--check"])
        return rc, capsys.readouterr().out

    return run


def test_check_fails_on_an_unbacked_figure_and_passes_once_it_names_its_command(check_readme):
    rc, out = check_readme("# T\n\nThe demo trains in 12 min 16 s on two cores.\n")
    assert rc == 1 and "README.md:3: '12 min', '16 s': measured, with no source in the paragraph" in out
    assert check_readme("# T\n\nThe demo trains in 12 min 16 s on two cores (`time make distill`).\n") == (0, "")


def test_a_unit_citing_a_bench_json_may_quote_only_that_json(check_readme):
    # The router figures an older README quoted, against the committed router.json: caught even with a command.
    stale = (
        "The router layer answers in 1.96 vs 1.34 ms p50, +1.6 / +2.3 ms at concurrency 4, and micro-batching "
        "gives 1.47x (`python bench/bench_router.py`, `bench/results/router.json`).\n"
    )
    rc, out = check_readme(stale)
    assert rc == 1
    for figure in ("'1.96 ms'", "'1.34 ms'", "'2.3 ms'", "'1.47x'"):
        assert f"{figure} is not in bench/results/router.json" in out
    current = (
        "The router layer answers in 1.57 vs 1.15 ms p50, +1.9 / +5.2 ms at concurrency 4, and micro-batching "
        "gives 1.40x (`bench/results/router.json`); the demo's teacher costs $0.00549 per 1,000 requests and "
        "keeps 62.0% local (`bench/results/cost.json`).\n"
    )
    assert check_readme(current) == (0, "")
    rc, out = check_readme("It took 3 s (`bench/results/nope.json`).\n")
    assert rc == 1 and "cites bench/results/nope.json, which does not exist" in out


def test_settings_versions_counts_and_transcripts_are_not_figures(check_readme):
    text = """# T

```
real	10m18.975s
router p50 12.6 ms
```

Bodies up to `1 MiB`; escalations rotate at `64 MiB` (`serve.max_queue` is `64`). Every figure has a 95% CI,
and the threshold holds at 95%
confidence. The recipe fits one A10G 24 GB or an A100 40/80 GB, or any 24 GB GPU. torch 2.13.0 for CUDA 13.0;
1,260 messages, 12 intents, a quality target of 0.8, seq 2048 x batch 4.

<!-- measured once: 5 s -->
"""
    assert check_readme(text) == (0, "")
    found = figure_lint.figures_in(
        "1.57 vs 1.15 ms, 4.75x, 0.70–0.87x, $0.0101, 42.5%, 7.08 prompts/s, 11.6 GiB, "
        "+2.6 points, 0.001 nats, `3 s`, 95% CI, x86_64, 2026-12-01, [a](b/1.5x.md)"
    )
    assert sorted(f.text for f in found) == sorted(
        [
            "1.15 ms",
            "4.75x",
            "0.87x",
            "42.5%",
            "7.08 prompts/s",
            "11.6 GiB",
            "2.6 points",
            "0.001 nats",
            "$0.0101",
            "1.57 ms",
            "0.70x",
        ]
    )


def test_table_rows_rely_on_their_caption_and_header_rows_are_names(check_readme):
    table = "| run | test, 70% most confident | training |\n|---|---|---|\n| a | 91.6% | 16.4 min |\n"
    assert check_readme(f"From `distill sweep banking77-cpu train.lora.r=64 --name b77-r64`:\n\n{table}") == (0, "")
    rc, out = check_readme(f"# Results\n\n{table}")
    assert (
        rc == 1 and "README.md:5: '91.6%', '16.4 min': measured, with no source in the table row or its caption" in out
    )
    assert "70%" not in out  # the header row names a column


def test_generated_blocks_must_be_balanced_and_name_a_bench(check_readme):
    rc, out = check_readme("<!-- bench:router:start -->\ntable\n")
    assert rc == 1 and "README.md:1: bench:router:start without its end" in out
    rc, out = check_readme("<!-- bench:nope:start -->\n<!-- bench:nope:end -->\n")
    assert rc == 1 and "bench:nope names no bench/results/nope.json" in out
