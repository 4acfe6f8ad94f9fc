"""The bench harness: quick runs of the cheap benches write complete, sane JSON; the report renders it.

Never asserts on a timing (these machines are shared): only that every field is there, numbers
are positive and finite, ratio = value / baseline, and every figure reaches RESULTS.md and the
README block. The benches run as `make bench` runs them, as scripts in a subprocess.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import figures  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "trl", "llama-cpp-python")
FIGURE_KEYS = {"name", "value", "unit", "better", "baseline", "baseline_name", "ratio", "headline", "note"}


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
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


def assert_envelope_complete(env: dict, script: str) -> None:
    assert env["quick"] is True
    assert script in env["command"] and "--quick" in env["command"]
    assert env["wall_s"] > 0 and env["started_at"]
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
    assert {"router layer, concurrency 1: router_null_backend p50",
            "router layer, concurrency 4: router_null_backend p99"} <= names
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


def rendered_figures_present(text: str, docs: list[tuple[str, dict]], readme_block: bool = False) -> None:
    """Each figure's row (in its bench's section of RESULTS.md, or its bench's rows of the README
    block, which holds the headline figures) shows its value, baseline and ratio."""
    for name, data in docs:
        if readme_block:
            lines = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        else:
            section = text.split(f"\n## {name}:", 1)[1].split("\n## ", 1)[0]
            lines = section.splitlines()
        for f in report.figures_of(name, data):
            if readme_block and not f["headline"]:
                continue
            row = [line for line in lines if f"| {f['name']} |" in line]
            assert len(row) == 1, f"{name}: {f['name']} missing or repeated"
            assert f"| {report.format_value(f)} |" in row[0], (f, row[0])
            assert f"| {report.format_ratio(f)} |" in row[0], (f, row[0])
            if f["baseline"] is not None:
                assert report.format_baseline(f) in row[0]


def test_report_renders_every_figure_of_fresh_and_committed_results(quick_results, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)  # committed: most predate the envelope
    for p in quick_results.glob("*.json"):
        shutil.copy(p, results / f"quick_{p.name}")  # unknown names: the generic extractor
    shutil.copy(quick_results / "curate.json", results / "curate.json")  # a fresh one with an envelope
    readme = tmp_path / "README.md"
    readme.write_text(f"# X\n\nabove\n\n{report.START}\nold table\n{report.END}\n\nbelow\n")

    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    docs = report.load(results)
    assert {name for name, _ in docs} >= {"curate", "finetune", "capture", "local_teacher", "router", "loop_demo",
                                          "teacher_prompt", "quick_router"}
    rendered_figures_present(text, docs)
    for name, _ in docs:
        assert f"## {name}:" in text
    assert report.NOT_RECORDED in text  # the committed JSON without an envelope
    assert "**quick run**" in text
    fresh = json.loads((results / "curate.json").read_text())["envelope"]
    assert fresh["command"] in text and fresh["versions"]["transformers"] in text

    body = readme.read_text()
    assert body.startswith("# X\n\nabove\n\n") and body.endswith("\n\nbelow\n") and "old table" not in body
    rendered_figures_present(body, docs, readme_block=True)
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    readme.write_text(body.replace("| router |", "| typed by hand |", 1))
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1


def test_committed_results_md_and_readme_block_are_generated_from_the_committed_json():
    assert report.main(["--check"]) == 0, "run: .venv/bin/python bench/report.py"


def test_ratio_is_value_over_baseline_for_every_committed_figure():
    for name, data in report.load(BENCH / "results"):
        assert_figures_sane(report.figures_of(name, data))


def test_bench_gpu_skips_cleanly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: make bench-gpu would run the GPU tier")
    proc = run_bench("bench_gpu.py", "--out-dir", str(tmp_path))
    assert "skipped" in proc.stdout and not list(tmp_path.iterdir())
