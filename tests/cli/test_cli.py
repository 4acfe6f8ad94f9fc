"""The CLI's contract for bad input: one clear line naming the file (and line or key), non-zero exit."""

import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, **capture):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "bad",
                "capture": {"task": str(ROOT / "data" / "task.yaml"), "cache": str(tmp_path / "c.sqlite"), **capture},
                "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            }
        )
    )
    return str(path)


def test_unknown_recipe_lists_recipes_and_fails(capsys):
    assert main(["finetune", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown recipe 'nope'" in err and "mistral7b" in err


def test_make_finetune_with_unknown_recipe_exits_non_zero():
    proc = subprocess.run(["make", "-s", "finetune", "RECIPE=nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "smollm2-135m-cpu" in proc.stderr


def test_unknown_recipe_key_is_one_line_with_the_key(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain:\n  lr: 0.1\n  epocs: 1\n")
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: unknown key 'train.epocs' (did you mean 'train.epochs'?)"


def test_broken_prompt_line_names_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "where is my order"}\n{"prompt": "refund please"\n')
    assert main(["capture", _recipe(tmp_path, prompts=str(prompts)), "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {prompts}:2: invalid JSON")
    assert not list((tmp_path / "runs" / "bad").glob("capture*/teacher.jsonl")), "no half-written artifact"


def test_missing_prompts_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    assert main(["capture", _recipe(tmp_path, prompts=str(missing)), "--runs-dir", str(tmp_path / "runs")]) == 1
    assert f"{missing}: file not found" in capsys.readouterr().err


def test_validate_accepts_shipped_recipe_with_overrides():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", "mistral7b", "train.epochs=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "mistral7b: ok" in proc.stdout


def test_serve_refuses_a_stage_folder_without_a_manifest(tmp_path, capsys):
    run = tmp_path / "runs" / "bad"
    (run / "evaluate").mkdir(parents=True)
    (run / "evaluate" / "router_policy.json").write_text('{"threshold": -1.0}')  # looks done, has no manifest
    assert main(["serve", _recipe(tmp_path), "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: {run / 'evaluate'}: no manifest.json, so evaluate has not completed there; run `distill evaluate` first"
    )


def test_overrides_suggested_in_help_are_real_recipe_fields(tmp_path, capsys):
    """`distill capture --help` lists the knobs users reach for first; each one must validate."""
    from pipeline.cli import STAGE_OVERRIDES
    from pipeline.config import load_recipe

    placeholder = {"PATH": str(tmp_path / "heldout.jsonl"), "URL": "http://127.0.0.1:8080/v1"}
    for overrides in STAGE_OVERRIDES.values():
        concrete = [o.split("=")[0] + "=" + placeholder.get(o.split("=", 1)[1], o.split("=", 1)[1]) for o in overrides]
        load_recipe("smollm2-135m-cpu", concrete, root=ROOT)
    assert main(["capture", "--help"]) == 0
    assert "teacher.budget_usd=5" in capsys.readouterr().out
