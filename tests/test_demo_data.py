"""The demo task data in data/: well-formed, big and balanced enough, disjoint from the worked examples, reproducible."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).resolve().parents[1] / "data"


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = (DATA / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # raises on any line that doesn't parse


@pytest.fixture(scope="module")
def task() -> dict:
    return yaml.safe_load((DATA / "task.yaml").read_text(encoding="utf-8"))


def test_rows_are_well_formed(rows):
    for row in rows:
        assert set(row) == {"id", "prompt", "gold"}
        assert row["prompt"].strip() and row["gold"]
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids)


def test_enough_distinct_prompts(rows):
    assert len({normalise(row["prompt"]) for row in rows}) >= 1000


def test_gold_labels_come_from_the_task(rows, task):
    assert {row["gold"] for row in rows} <= set(task["labels"])


def test_labels_are_covered_and_balanced(rows):
    counts = Counter(row["gold"] for row in rows)
    assert len(counts) >= 10
    assert min(counts.values()) >= 50, counts


def test_examples_cover_each_label_once_and_are_held_out(rows, task):
    labels = [example["label"] for example in task["examples"]]
    assert sorted(labels) == sorted(task["labels"])
    prompts = {normalise(row["prompt"]) for row in rows}
    assert not [e["prompt"] for e in task["examples"] if normalise(e["prompt"]) in prompts]


def test_generator_is_deterministic(tmp_path):
    out = tmp_path / "prompts.jsonl"
    subprocess.run([sys.executable, str(DATA / "generate_demo.py"), "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == (DATA / "prompts.jsonl").read_bytes()
