"""The demo task data in data/: well-formed, big and balanced enough, disjoint from the worked examples, reproducible."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).resolve().parents[2] / "data"


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
    subprocess.run([sys.executable, str(DATA / "generate_demo.py"), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == (DATA / "prompts.jsonl").read_bytes()


# ---------------------------------------------------------------- the conversational demo (chats.jsonl)


@pytest.fixture(scope="module")
def chats() -> list[dict]:
    return [json.loads(line) for line in (DATA / "chats.jsonl").read_text(encoding="utf-8").splitlines()]


def test_chats_are_what_an_app_sends_with_context_that_varies(chats):
    """A system prompt with per-request data, one or two earlier exchanges, the customer's message last."""
    from pipeline.conversation import check_conversation, read_messages

    assert len(chats) >= 240 and len({c["id"] for c in chats}) == len(chats)
    for chat in chats:
        messages = read_messages(chat["messages"])
        check_conversation(messages)
        assert messages[0]["role"] == "system" and "Customer:" in messages[0]["content"]
        assert [m["role"] for m in messages[1:]] in (
            ["user", "assistant", "user"],
            ["user", "assistant"] * 2 + ["user"],
        )
        assert chat["reference"].strip()
    assert len({c["messages"][0]["content"] for c in chats}) == len(chats)  # per-request context
    histories = Counter(len(c["messages"]) for c in chats)
    assert histories[4] > 0 and histories[6] > 0


def test_chats_generator_is_deterministic(tmp_path):
    out = tmp_path / "chats.jsonl"
    subprocess.run(
        [sys.executable, str(DATA / "generate_chats.py"), "--out", str(out)], check=True, capture_output=True
    )
    assert out.read_bytes() == (DATA / "chats.jsonl").read_bytes()
