"""The conversational demo (recipes/support-chats-cpu.yaml) end to end at tiny size: the embedded
teacher answers whole chats, a tiny random student is trained, evaluated and exported on them, and
every stage says the student reads the conversation as sent.

    .venv/bin/pytest -q tests/e2e/test_chats_e2e.py
"""

import json
from pathlib import Path

import pytest
import yaml

from pipeline.artifacts import read_manifest
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chats_run(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("chats")
    recipe = yaml.safe_load((ROOT / "recipes" / "support-chats-cpu.yaml").read_text())
    recipe["model"] |= {"base": str(tiny_llama_dir), "chat_template": str(ROOT / recipe["model"]["chat_template"])}
    recipe["teacher"] |= {"max_new_tokens": 8}
    recipe["capture"] |= {
        "prompts": str(ROOT / recipe["capture"]["prompts"]),
        "task": str(ROOT / recipe["capture"]["task"]),
        "limit": 24,
        "cache": str(folder / "cache.sqlite"),
    }
    # Answers cut at 8 tokens are kept: the splits stay non-empty at this size.
    recipe["curate"] |= {"drop_truncated": False, "min_examples": 10}
    recipe["train"] |= {"max_steps": 2, "batch_size": 4, "eos_check": "warn"}
    recipe["eval"] |= {"max_new_tokens": 4, "limit": 8, "bootstrap": 100}
    recipe["export"] |= {"verify_prompts": 2, "verify_max_new_tokens": 4, "parity_max_new_tokens": 4}
    recipe["tracking"] = {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "chats"}
    path = folder / "chats.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--runs-dir", str(folder / "runs")]) == 0
    return folder / "runs" / "support-chats-cpu"


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_capture_records_whole_chats_and_curate_keeps_them(chats_run):
    chats = {r["id"]: r["messages"] for r in lines(ROOT / "data" / "chats.jsonl")}
    records = lines(chats_run / "capture" / "teacher.jsonl")
    assert len(records) == 24 and all(r["messages"][:-1] == chats[r["id"]] for r in records)
    view = json.loads((chats_run / "curate" / "student_input.json").read_text())
    assert (view["requested"], view["shape"]) == ("auto", "conversation")
    curated = [r for s in ("train", "validation", "test") for r in lines(chats_run / "curate" / f"{s}.jsonl")]
    assert curated and all(r["messages"][0]["role"] == "system" and len(r["messages"]) >= 5 for r in curated)
    assert "The student reads: **conversation**" in (chats_run / "curate" / "card.md").read_text()


def test_the_policy_and_the_export_record_the_conversation_input(chats_run):
    from pipeline.errors import DistillError
    from pipeline.llm.policy import Policy
    from pipeline.router.wiring import check_policy_matches_export

    policy_path = chats_run / "evaluate" / "router_policy.json"
    assert Policy.load(policy_path).student_input == "conversation"
    assert read_manifest(chats_run / "export").student_input == "conversation"
    check_policy_matches_export(policy_path, chats_run / "export")
    other = chats_run.parent / "other_policy.json"
    other.write_text(json.dumps({**json.loads(policy_path.read_text()), "student_input": "user"}))
    with pytest.raises(DistillError, match="trained on the conversation input"):
        check_policy_matches_export(other, chats_run / "export")


def test_evaluate_answered_the_conversations(chats_run):
    predictions = lines(chats_run / "evaluate" / "predictions.jsonl")
    assert predictions and all(p["messages"][0]["role"] == "system" for p in predictions)
    assert read_manifest(chats_run / "finetune").counts["train_examples"] > 0
