"""`distill sweep`: two real trials on a tiny random student, a known winner, a real MLflow store.

The teacher is a logs: CSV whose label follows the prompt's first word. One trial's learning
rate is so small the adapter cannot move (its answers stay the random model's gibberish); the
other learns at least to answer with a label (8 steps: ~25 s a trial on 2 busy cores). The sweep
must pick the second on validation.
"""

import csv
import json
import random
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.errors import DistillError
from pipeline.sweep.plan import grid, parse_axes, plan_sweep, split_values, trial_name

GOOD_LR, BAD_LR = "2e-2", "1e-9"
WORDS = ["apple", "river", "stone", "cloud", "lamp", "chair", "wind", "paper", "glass", "field", "bread", "tower"]


def write_inputs(folder: Path, student: Path) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(64):
        label = "yes" if i % 2 else "no"
        rows.append(
            {
                "text": f"{'sun' if label == 'yes' else 'moon'} " + " ".join(rng.sample(WORDS, 6)) + f" {i}",
                "label": label,
            }
        )
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "task.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "sun-or-moon",
                "kind": "classification",
                "labels": ["yes", "no"],
                "instructions": "Reply yes when the message starts with sun, no otherwise.",
            }
        )
    )
    recipe = {
        "name": "sweepy",
        "model": {"base": str(student)},
        "teacher": {"spec": f"logs:{folder / 'labels.csv'}", "prompt_col": "text", "label_col": "label"},
        "capture": {"task": str(folder / "task.yaml"), "cache": str(folder / "cache.sqlite")},
        "curate": {
            "near_dup_threshold": None,
            "embeddings": "tfidf",
            "min_examples": 10,
            "split": {"validation": 0.25, "test": 0.25},
        },
        "train": {
            "max_steps": 8,
            "batch_size": 8,
            "max_seq_len": 64,
            "logging_steps": 10,
            "save_steps": 100,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "eos_check": "warn",
        },
        # Both labels are one token: the answer is the first token, which 8 steps teach (stopping takes longer).
        "eval": {"max_new_tokens": 1, "bootstrap": 100},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "sweep-test"},
    }
    path = folder / "sweepy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("sweep")
    recipe = write_inputs(folder, tiny_llama_dir)
    runs = folder / "runs"
    args = ["sweep", str(recipe), f"train.lr={BAD_LR},{GOOD_LR}", "--runs-dir", str(runs)]
    assert main(args) == 0
    sweep_dir = next((runs / "sweepy" / "sweeps").iterdir())
    return folder, args, runs, sweep_dir


def test_the_sweep_picks_the_trial_that_learned_on_validation(swept):
    _, _, _, sweep_dir = swept
    results = json.loads((sweep_dir / "results.json").read_text())
    scores = {t["overrides"][0]: t["score"]["value"] for t in results["trials"]}
    assert set(scores) == {f"train.lr={BAD_LR}", f"train.lr={GOOD_LR}"}
    assert scores[f"train.lr={GOOD_LR}"] > scores[f"train.lr={BAD_LR}"]
    assert scores[f"train.lr={GOOD_LR}"] >= 0.5  # at least the majority label, as a label
    assert results["winner"] == f"train.lr={GOOD_LR}"
    assert all(t["score"]["n"] == 16 for t in results["trials"])  # the validation split, not test
    md = (sweep_dir / "results.md").read_text()
    assert "validation agreement" in md and f"`train.lr={GOOD_LR}`" in md
    assert (sweep_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_trial_has_its_own_folder_and_reuses_the_shared_curate(swept):
    _, _, runs, sweep_dir = swept
    shared = runs / "sweepy" / "curate" / "train.jsonl"
    for lr in (BAD_LR, GOOD_LR):
        trial = sweep_dir / f"train.lr={lr}"
        assert {p.name for p in trial.iterdir()} >= {"capture", "curate", "finetune", "evaluate", "trial.json"}
        assert (trial / "curate" / "train.jsonl").stat().st_ino == shared.stat().st_ino  # hard link, not a rerun
        resolved = yaml.safe_load((trial / "finetune" / "resolved_config.yaml").read_text())
        assert resolved["train"]["lr"] == float(lr)
    assert not (runs / "sweepy" / "finetune").exists(), "trials train in their own folders only"


def test_child_runs_sit_under_the_parent_with_the_winner_tagged(swept):
    from mlflow.tracking import MlflowClient

    folder, _, _, sweep_dir = swept
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    experiment = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    children = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id and "distill.sweep.trial" in r.data.tags
    ]
    assert sorted(r.data.tags["distill.sweep.trial"] for r in children) == sorted(
        f"train.lr={lr}" for lr in (BAD_LR, GOOD_LR)
    )
    for child in children:
        assert "validation_agreement" in child.data.metrics
        stages = {
            r.data.tags.get("mlflow.runName")
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == child.info.run_id
        }
        assert stages == {"finetune", "evaluate"}  # capture and curate were linked, not rerun
    parent = client.get_run(parent_id)
    winner = next(c for c in children if c.data.tags["distill.sweep.trial"] == f"train.lr={GOOD_LR}")
    assert parent.data.tags["distill.sweep.winner"] == f"train.lr={GOOD_LR}"
    assert parent.data.tags["distill.sweep.winner_run_id"] == winner.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"results.md", "results.png", "results.json"} <= artifacts


def test_a_rerun_skips_finished_trials_and_keeps_the_parent(swept):
    from mlflow.tracking import MlflowClient

    folder, args, _, sweep_dir = swept
    before = {lr: (sweep_dir / f"train.lr={lr}" / "trial.json").read_text() for lr in (BAD_LR, GOOD_LR)}
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep-test")
    count = len(client.search_runs([experiment.experiment_id], max_results=100))
    assert main(args) == 0
    assert {lr: (sweep_dir / f"train.lr={lr}" / "trial.json").read_text() for lr in (BAD_LR, GOOD_LR)} == before
    assert len(client.search_runs([experiment.experiment_id], max_results=100)) == count  # no new child run
    assert json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"] == parent_id


def test_axes_split_on_commas_outside_brackets():
    assert split_values("[q_proj,v_proj],all-linear") == ["[q_proj,v_proj]", "all-linear"]
    axes = parse_axes(["train.lr=1e-3,3e-4", "train.lora.targets=[q_proj,v_proj],all-linear", "train.epochs=2"])
    trials = grid(axes)
    assert len(trials) == 4 and trials[0] == ("train.lr=1e-3", "train.lora.targets=[q_proj,v_proj]", "train.epochs=2")
    assert trial_name(trials[0], axes) == "train.lr=1e-3__train.lora.targets=_q_proj_v_proj_"


@pytest.mark.parametrize(
    "items, message",
    [
        ([], "at least one axis"),
        (["train.lr=1e-3,,2e-3"], "empty value"),
        (["train.lr=1e-3,1e-3"], "listed twice"),
        (["lr=1e-3"], "section.key=v1,v2"),
        (["train.lr=1e-3", "train.lr=2e-3"], "given twice"),
    ],
)
def test_bad_axes_are_refused_before_anything_runs(items, message):
    with pytest.raises(DistillError, match=message):
        parse_axes(items)


def test_every_trial_recipe_is_validated_up_front(tmp_path, tiny_llama_dir):
    recipe = write_inputs(tmp_path, tiny_llama_dir)
    with pytest.raises(DistillError, match=r"trial train.lr=-1 train.epochs=2: .*train.lr: Input should be greater"):
        plan_sweep(str(recipe), ["train.lr=1e-3,-1", "train.epochs=2"], tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
