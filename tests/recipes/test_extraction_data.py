"""The extraction demo in data/: every gold record validates against the task's schema, the hard
cases (absent and ambiguous fields) are there, the worked examples are held out, and the
generator is reproducible."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pytest

from pipeline.task import load_task

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / "extraction_prompts.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def task():
    return load_task(DATA / "extraction_task.yaml")


def test_every_gold_record_and_worked_example_validates(rows, task):
    assert task.kind == "extraction" and len(rows) == 900
    assert len({r["id"] for r in rows}) == len(rows) and len({r["prompt"] for r in rows}) == len(rows)
    for row in rows:
        jsonschema.validate(row["gold"], task.output_schema)
        assert list(row["gold"]) == list(task.output_schema["properties"])  # the schema's key order
        assert set(row["ambiguous"]) <= set(task.output_schema["properties"]) and row["summary"]
    for example in task.examples:
        jsonschema.validate(json.loads(example.label), task.output_schema)


def test_absent_and_ambiguous_fields_are_represented(rows, task):
    """Each optional field is absent in some records and present in others; every request type
    occurs; some rows are marked hard on purpose."""
    for name in ("order_id", "customer_name", "order_date", "amount", "currency", "contact_email"):
        absent = sum(r["gold"][name] is None for r in rows)
        assert 0.1 * len(rows) < absent < 0.9 * len(rows), (name, absent)
    assert any(r["gold"]["items"] == [] for r in rows) and any(len(r["gold"]["items"]) > 1 for r in rows)
    assert set(Counter(r["gold"]["request_type"] for r in rows)) == set(
        task.output_schema["properties"]["request_type"]["enum"]
    )
    assert sum(bool(r["ambiguous"]) for r in rows) >= 50


def test_worked_examples_are_held_out(rows, task):
    prompts = {" ".join(r["prompt"].lower().split()) for r in rows}
    assert not [e.prompt for e in task.examples if " ".join(e.prompt.lower().split()) in prompts]


def test_generator_is_deterministic(tmp_path):
    out = tmp_path / "extraction_prompts.jsonl"
    subprocess.run(
        [sys.executable, str(DATA / "generate_extraction.py"), "--out", str(out)], check=True, capture_output=True
    )
    assert out.read_bytes() == (DATA / "extraction_prompts.jsonl").read_bytes()
