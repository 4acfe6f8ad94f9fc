"""`distill init NAME --from FILE`: a task file and a recipe inferred from logs, each choice commented,
valid, and runnable (capture and curate run on what it wrote).

    .venv/bin/pytest -q tests/cli/test_init.py
"""

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.artifacts import read_manifest
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project folder as `distill init` expects to run in: recipes/templates/ at hand."""
    (tmp_path / "recipes" / "templates").mkdir(parents=True)
    shutil.copy(ROOT / "recipes" / "templates" / "chatml.jinja", tmp_path / "recipes" / "templates")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def init(name: str, source: Path, capsys, *options: str) -> tuple[dict, dict, str, str]:
    assert main(["init", name, "--from", str(source), *options]) == 0
    out = capsys.readouterr().out
    assert f"next: make distill RECIPE={name}" in out
    task_text, recipe_text = Path(f"data/{name}_task.yaml").read_text(), Path(f"recipes/{name}.yaml").read_text()
    assert main(["validate", name]) == 0
    return yaml.safe_load(task_text), yaml.safe_load(recipe_text), task_text, recipe_text


def curate(name: str) -> Path:
    tracking = f"tracking.uri=sqlite:///{Path('mlflow.db').resolve()}"
    assert main(["curate", name, tracking, "curate.min_examples=10"]) == 0
    return Path("runs") / name / "curate"


def test_the_demo_chats_make_a_free_text_recipe_that_keeps_the_conversation(workdir, capsys):
    """The demo's chats as an OpenAI chat log: free text, a system prompt that varies (conversation)."""
    rows = [json.loads(line) for line in (ROOT / "data" / "chats.jsonl").read_text().splitlines()][:120]
    log = workdir / "chat_log.jsonl"
    log.write_text(
        "".join(
            json.dumps({"messages": [*r["messages"], {"role": "assistant", "content": r["reference"]}]}) + "\n"
            for r in rows
        )
    )
    task, recipe, task_text, recipe_text = init("chats", log, capsys)
    assert task["kind"] == "generation" and recipe["model"]["student_input"] == "conversation"
    assert "120 distinct system prompts" in recipe_text and "free text" in task_text
    assert recipe["teacher"]["spec"] == f"logs:{log}" and "prompt_col" not in recipe["teacher"]
    assert 128 <= recipe["train"]["max_seq_len"] <= 512 and "p99" in recipe_text
    assert recipe["curate"]["target_size"] is None
    view = json.loads((curate("chats") / "student_input.json").read_text())
    assert view["shape"] == "conversation"


def banking_csv(path: Path, n: int = 200) -> Path:
    """Banking77-shaped: text,label; ten intents, a few off-label answers."""
    rng = random.Random(0)
    intents = [
        "card_arrival",
        "card_linking",
        "exchange_rate",
        "top_up_failed",
        "lost_or_stolen_card",
        "refund",
        "pin_blocked",
        "cash_withdrawal",
        "transfer_timing",
        "verify_identity",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = intents[i % len(intents)] if i % 40 else f"unsure {i}"
            writer.writerow([f"question {i} about {label.replace('_', ' ')} {rng.randint(0, 10**6)}", label])
    return path


def test_a_banking77_style_csv_makes_a_classification_recipe(workdir, capsys):
    task, recipe, task_text, recipe_text = init("banking", banking_csv(workdir / "train.csv"), capsys)
    assert task["kind"] == "classification" and len(task["labels"]) == 10 and "unsure 0" not in task["labels"]
    assert "10 distinct answers cover 98% of the 200 records" in task_text
    assert task["instructions"].startswith("Reply with exactly one label")
    assert (recipe["teacher"]["prompt_col"], recipe["teacher"]["label_col"]) == ("text", "label")
    assert recipe["model"]["student_input"] == "user" and recipe["router"]["signal"] == "label_prob"
    card = (curate("banking") / "card.md").read_text()
    assert "off_label" in card  # the 5 answers outside the inferred label set are dropped by curate


def test_json_answers_make_an_extraction_recipe_with_an_inferred_schema(workdir, capsys):
    system = "Extract the order id and the issue as a JSON object."
    issues = ["late", "damaged", "wrong item", "missing"]
    rows = []
    for i in range(60):
        answer = {"order_id": f"A-{1000 + i}", "issue": issues[i % 4]}
        if i % 3 == 0:
            answer["amount"] = 10.5 + i
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Order A-{1000 + i} is {issues[i % 4]}, please help"},
                    {"role": "assistant", "content": json.dumps(answer)},
                ]
            }
        )
    rows.append(
        {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Sorry, which order?"},
            ]
        }
    )
    log = workdir / "extract.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, recipe, task_text, _ = init("extract", log, capsys)
    assert task["kind"] == "extraction" and "60 of 61 answers (98%) are JSON objects" in task_text
    schema = task["output_schema"]
    assert schema["type"] == "object" and sorted(schema["required"]) == ["issue", "order_id"]
    assert schema["properties"]["amount"]["type"] == "number"
    assert recipe["model"]["student_input"] == "user" and task["instructions"] == system
    assert read_manifest(curate("extract")).counts["removed_invalid_json"] == 1


def test_init_refuses_to_overwrite_and_names_the_file(workdir, capsys):
    log = banking_csv(workdir / "train.csv", 60)
    assert main(["init", "b", "--from", str(log)]) == 0
    assert main(["init", "b", "--from", str(log)]) == 1
    assert "data/b_task.yaml exists; choose another name or pass --force" in capsys.readouterr().err
