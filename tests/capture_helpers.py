"""Shared by tests/test_capture*.py and bench/bench_capture.py: prompt files and capture recipes."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "data" / "task.yaml"


def write_prompts(path: Path, n: int, prefix: str = "question") -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i:04d}", "prompt": f"{prefix} number {i}"}) + "\n" for i in range(n)))
    return path


def write_recipe(folder: Path, teacher: dict, capture: dict | None = None, tracking_uri: str | None = None,
                 name: str = "cap") -> Path:
    """A recipe whose capture section points into `folder` (own cache) and whose MLflow store is shared."""
    recipe = {
        "name": name,
        "teacher": {"few_shot": False, "max_new_tokens": 4, **teacher},
        "capture": {"prompts": str(folder / "prompts.jsonl"), "task": str(TASK),
                    "cache": str(folder / "cache.sqlite"), **(capture or {})},
        "tracking": {"uri": tracking_uri or f"sqlite:///{folder / 'mlflow.db'}", "experiment": "capture-tests"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def fast_retries(base_url: str, **extra) -> dict:
    """Teacher settings for a loopback fault server: short timeouts and backoff, a known price."""
    return {
        "spec": "openai:fault-model", "base_url": base_url, "timeout_s": 5, "max_retries": 8,
        "backoff_initial_s": 0.01, "backoff_max_s": 0.2, "concurrency": 8,
        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}, **extra,
    }


def read_records(runs: Path, name: str = "cap") -> list[dict]:
    return [json.loads(line) for line in (runs / name / "capture" / "teacher.jsonl").read_text().splitlines()]
