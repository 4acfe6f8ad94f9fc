"""Two real processes (torchrun, gloo on CPU) through the runner: one folder, one writer, one MLflow run per stage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.artifacts import hash_outputs, read_manifest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def recipe(tmp_path, tiny_llama_dir) -> Path:
    """Labels imported from logs (no teacher to run), a tiny random student, two training steps."""
    rows = [json.loads(line) for line in (ROOT / "data" / "prompts.jsonl").read_text().splitlines()[:48]]
    logs = tmp_path / "labels.jsonl"
    logs.write_text("".join(json.dumps({"prompt": r["prompt"], "label": r["gold"]}) + "\n" for r in rows))
    path = tmp_path / "ddp.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "ddp",
                "model": {"base": str(tiny_llama_dir)},
                "teacher": {"spec": f"logs:{logs}"},
                "capture": {"task": str(ROOT / "data" / "task.yaml"), "cache": str(tmp_path / "cache.sqlite")},
                "curate": {"min_examples": 10},
                "train": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "max_seq_len": 128, "eos_check": "off"},
                "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ddp"},
            }
        )
    )
    return path


@pytest.mark.slow
def test_two_ranks_train_and_only_the_main_process_writes(recipe, tmp_path):
    from mlflow.tracking import MlflowClient

    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "pipeline",
        "finetune",
        str(recipe),
        "--runs-dir",
        str(runs),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = runs / "ddp"
    assert sorted(p.name for p in run.iterdir()) == ["capture", "curate", "finetune"], "a partial folder survived"
    manifest = read_manifest(run / "finetune")
    assert manifest.outputs == hash_outputs(run / "finetune")
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "train_log.jsonl"} <= set(
        manifest.outputs
    )
    assert manifest.counts["steps"] == 2

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    names = sorted(r.info.run_name for r in found)
    assert names == sorted(["ddp", "capture", "curate", "finetune"]), names
    finetune_run = next(r for r in found if r.info.run_name == "finetune")
    assert finetune_run.data.params["world_size"] == "2", "the ranks trained alone instead of together"
