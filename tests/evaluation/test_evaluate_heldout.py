"""eval.file: the user's held-out file is read from JSONL (prompt or chat messages) or CSV."""

import json

import pytest

from pipeline.config import validate_recipe
from pipeline.errors import DistillError
from pipeline.evaluation.heldout import read_heldout, teacher_answers
from pipeline.stages import evaluate


def test_reads_jsonl_prompts_chat_messages_and_csv(tmp_path):
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text(
        json.dumps({"id": "a", "prompt": " where is my parcel ", "gold": "track_order"})
        + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "refund please"}]})
        + "\n"
    )
    rows = read_heldout(jsonl, "prompt", "gold")
    assert rows == [
        {"id": "a", "messages": [{"role": "user", "content": "where is my parcel"}], "gold": "track_order"},
        {
            "id": "heldout-1",
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "refund please"}],
            "gold": "",
        },
    ]
    csv = tmp_path / "eval.csv"
    csv.write_text("text,label\nmy card was declined,payment_failed\n")
    assert read_heldout(csv, "text", "label") == [
        {"id": "heldout-0", "gold": "payment_failed", "messages": [{"role": "user", "content": "my card was declined"}]}
    ]
    with pytest.raises(DistillError, match="no prompts \\(expected a 'question' field"):
        read_heldout(csv, "question", None)


def test_eval_file_is_a_tracked_input_and_a_logs_teacher_cannot_answer_it(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    recipe = validate_recipe({"name": "t", "eval": {"file": str(path)}, "teacher": {"spec": f"logs:{path}"}}, "t")
    assert evaluate.file_inputs(recipe)["eval_file"] == path
    with pytest.raises(DistillError, match="eval.file needs a teacher that can answer"):
        teacher_answers(recipe, None, [{"id": "1", "messages": [{"role": "user", "content": "x"}], "gold": ""}])
