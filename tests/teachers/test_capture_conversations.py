"""Imports keep the conversation as it was sent: every turn, byte for byte, in each format people have.

    .venv/bin/pytest -q tests/teachers/test_capture_conversations.py

Through the real CLI (`distill capture RECIPE --force`, teacher.spec=logs:...) and the real runner;
each test compares the records' turns with the source's, serialised, so a dropped system prompt,
a lost earlier exchange or a rewritten character fails it.
"""

import csv
import json
from pathlib import Path

import pytest
from support.capture_helpers import read_records, write_recipe

from pipeline.artifacts import read_manifest
from pipeline.cli import main
from pipeline.conversation import read_messages


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def capture(tmp_path: Path, spec: str, tracking_uri: str, *overrides: str) -> list[dict]:
    recipe = write_recipe(tmp_path, {"spec": spec}, tracking_uri=tracking_uri)
    assert main(["capture", str(recipe), *overrides, "--runs-dir", str(tmp_path / "runs"), "--force"]) == 0
    return read_records(tmp_path / "runs")


def manifest(tmp_path: Path):
    return read_manifest(tmp_path / "runs" / "cap" / "capture")


def as_bytes(messages: list[dict]) -> bytes:
    return json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()


def chat_logs(n: int = 60) -> list[dict]:
    """What an app sends: a system prompt with per-request data; every other record an earlier exchange."""
    tiers = ["Premium customer since 2015", "Basic plan, joined 2023", "Business account, 14 seats"]
    records = []
    for i in range(n):
        turns = [
            {
                "role": "system",
                "content": f"You are Acme's support agent.\nCustomer profile: {tiers[i % 3]}; "
                f"customer #{1000 + i}, last order A-{i:04d}.",
            }
        ]
        if i % 2:
            turns += [
                {"role": "user", "content": f"Hi, I have a question about order A-{i:04d}."},
                {"role": "assistant", "content": "Of course, what would you like to know?"},
            ]
        turns += [
            {"role": "user", "content": f"Where is it? It's been {i % 9 + 2} days…"},
            {"role": "assistant", "content": f"Order A-{i:04d} left our warehouse yesterday."},
        ]
        records.append({"messages": turns})
    return records


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_sixty_chat_logs_keep_every_system_prompt_and_every_history(tmp_path, tracking_uri):
    """The issue's check: 60 chat-log records, each with per-request data in its system prompt and
    half with an earlier exchange, imported with logs:. Before, 60/60 lost the system prompt and
    30/30 the history (the importer kept the last user message)."""
    logs = chat_logs()
    records = capture(tmp_path, f"logs:{write_jsonl(tmp_path / 'chat.jsonl', logs)}", tracking_uri)
    assert len(records) == 60
    kept_system = sum(r["messages"][0] == log["messages"][0] for r, log in zip(records, logs))
    with_history = [r for r, log in zip(records, logs) if len(log["messages"]) == 5]
    assert kept_system == 60
    assert len(with_history) == 30 and all(len(r["messages"]) == 5 for r in with_history)
    assert [as_bytes(r["messages"]) for r in records] == [as_bytes(log["messages"]) for log in logs]
    assert all(r["meta"]["source"] == "logs" and r["meta"]["prompt_sha"] for r in records)


def test_openai_fine_tuning_jsonl_joins_text_parts_and_keeps_developer_and_request(tmp_path, tracking_uri):
    rows = [
        {
            "messages": [
                {"role": "developer", "content": "Answer in French."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Where is "}, {"type": "text", "text": "my parcel?"}],
                },
                {"role": "assistant", "content": "En route.", "weight": 1},
            ],
            "response_format": {"type": "text"},
            "max_tokens": 20,
            "temperature": 0,
            "metadata": {"app": "x"},
        },
        {
            "messages": [
                {"role": "user", "content": 'quote " and \\ backslash, ünïcode ✓'},
                {"role": "assistant", "content": "ok"},
            ]
        },
    ]
    records = capture(tmp_path, f"logs:{write_jsonl(tmp_path / 'ft.jsonl', rows)}", tracking_uri)
    assert as_bytes(records[0]["messages"]) == as_bytes(
        [
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Where is my parcel?"},
            {"role": "assistant", "content": "En route."},
        ]
    )
    assert as_bytes(records[1]["messages"]) == as_bytes(rows[1]["messages"])
    assert records[0]["meta"]["request"] == {"response_format": {"type": "text"}, "max_tokens": 20, "temperature": 0}
    assert records[1]["meta"]["request"] == {}


def test_openai_batch_input_and_output_files_join_by_custom_id(tmp_path, tracking_uri):
    convs = [log["messages"] for log in chat_logs(4)]
    inputs = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": c[:-1], "max_tokens": 64},
        }
        for i, c in enumerate(convs)
    ]

    def answer(i, c):
        return {
            "id": f"batch_req_{i}",
            "custom_id": f"req-{i}",
            "error": None,
            "response": {
                "status_code": 200,
                "request_id": "r",
                "body": {
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": c[-1]["content"], "refusal": None},
                        }
                    ],
                },
            },
        }

    outputs = [answer(i, c) for i, c in reversed(list(enumerate(convs)))]  # the output file has its own order
    outputs[0] = {
        "id": "batch_req_3",
        "custom_id": "req-3",
        "response": None,
        "error": {"code": "server_error", "message": "the model crashed"},
    }
    input_file = write_jsonl(tmp_path / "batch_input.jsonl", inputs)
    output_file = write_jsonl(tmp_path / "batch_output.jsonl", outputs)
    records = capture(tmp_path, f"logs:{output_file}+{input_file}", tracking_uri)  # either order
    assert [r["id"] for r in records] == ["req-0", "req-1", "req-2"]
    assert [as_bytes(r["messages"]) for r in records] == [as_bytes(c) for c in convs[:3]]
    assert records[0]["meta"]["request"] == {"max_tokens": 64}
    m = manifest(tmp_path)
    assert m.counts["rejected"] == 1 and any(
        f"{input_file}:4 (the batch request failed (the model crashed" in note for note in m.notes
    ), m.notes


def test_sharegpt_conversations_keep_every_turn(tmp_path, tracking_uri):
    rows = [
        {
            "id": "s1",
            "conversations": [
                {"from": "system", "value": "Customer: Premium since 2015."},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "refund my order"},
                {"from": "gpt", "value": "Done."},
            ],
        },
        {"id": "s2", "conversations": [{"from": "narrator", "value": "?"}, {"from": "gpt", "value": "x"}]},
    ]
    records = capture(tmp_path, f"logs:{write_jsonl(tmp_path / 'sharegpt.jsonl', rows)}", tracking_uri)
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert as_bytes(records[0]["messages"]) == as_bytes(
        [{"role": roles[t["from"]], "content": t["value"]} for t in rows[0]["conversations"]]
    )
    assert any("sharegpt.jsonl:2 (turn 0 is from 'narrator'" in note for note in manifest(tmp_path).notes)


def test_a_saved_datasets_dataset_with_a_messages_column(tmp_path, tracking_uri):
    from datasets import Dataset, DatasetDict

    logs = chat_logs(6)
    folder = tmp_path / "chats"
    DatasetDict({"train": Dataset.from_list(logs)}).save_to_disk(str(folder))
    records = capture(tmp_path, f"logs:{folder}", tracking_uri)
    assert [as_bytes(r["messages"]) for r in records] == [as_bytes(log["messages"]) for log in logs]


def test_csv_columns_still_import_as_one_user_turn(tmp_path, tracking_uri):
    path = tmp_path / "support.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["message", "intent"], ["my card was declined ", "payment_failed"]])
    recipe = write_recipe(
        tmp_path, {"spec": f"logs:{path}", "prompt_col": "message", "label_col": "intent"}, tracking_uri=tracking_uri
    )
    assert main(["capture", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--force"]) == 0
    (record,) = read_records(tmp_path / "runs")
    assert record["messages"] == [
        {"role": "user", "content": "my card was declined "},
        {"role": "assistant", "content": "payment_failed"},
    ]


def test_tool_calls_images_and_audio_are_counted_per_kind_not_dropped_silently(tmp_path, tracking_uri, caplog):
    ok = chat_logs(1)[0]
    tool_call = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
            {"role": "tool", "tool_call_id": "1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    tool_role = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "tool", "content": "y"},
            {"role": "user", "content": "z"},
            {"role": "assistant", "content": "w"},
        ]
    }
    image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:"}},
                ],
            },
            {"role": "assistant", "content": "A cat."},
        ]
    }
    audio = {
        "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    path = write_jsonl(tmp_path / "mixed.jsonl", [ok, tool_call, image, tool_role, audio])
    records = capture(tmp_path, f"logs:{path}", tracking_uri)
    assert len(records) == 1
    m = manifest(tmp_path)
    assert (m.counts["skipped_tool_calls"], m.counts["skipped_images"], m.counts["skipped_audio"]) == (2, 1, 1)
    assert "skipped 2 records: tool calls are not supported" in m.notes
    assert "skipped 1 record: images are not supported" in m.notes
    assert "skipped 2 records: tool calls are not supported" in caplog.text


def test_each_unreadable_record_is_counted_with_its_line_and_reason(tmp_path, tracking_uri):
    good = chat_logs(1)[0]
    rows = [
        good,
        {"messages": [{"role": "user", "content": "hello"}]},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "critic", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": "not a list"},
        good,
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert len(capture(tmp_path, f"logs:{path}", tracking_uri)) == 2
    notes = " ".join(manifest(tmp_path).notes)
    assert manifest(tmp_path).counts["rejected"] == 4
    for line, why in [
        (2, "does not end in an assistant answer"),
        (3, "no user turn right before the answer"),
        (4, "turn 0 has role 'critic'"),
        (5, "messages is not a non-empty list of turns"),
    ]:
        assert f"{path}:{line} ({why}" in notes, (line, notes)


def test_old_single_prompt_records_still_read(tmp_path, tracking_uri):
    """capture.records (what retrain takes) and logs: both read the [user, assistant] records of before."""
    old = [
        {
            "id": "a",
            "messages": [
                {"role": "user", "content": "where is my parcel"},
                {"role": "assistant", "content": "track_order"},
            ],
            "meta": {"gold": "track_order"},
        }
    ]
    path = write_jsonl(tmp_path / "old.jsonl", old)
    records = capture(tmp_path, "local:embedded:smollm2-135m-instruct", tracking_uri, f"capture.records={path}")
    assert records == old
    assert read_messages(old[0]["messages"]) == old[0]["messages"]


def test_prompt_conversations_reach_the_teacher_as_sent_and_are_recorded_whole(tmp_path, tracking_uri):
    """A prompts file may hold conversations: the teacher gets one with its own system prompt as it
    is, and a bare prompt after the task's instructions; each record holds what the app sent."""
    from support.capture_helpers import TASK, fast_retries
    from support.fault_server import FaultServer, answer_for

    from pipeline.task import load_task

    conversation = chat_logs(2)[1]["messages"][:-1]
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"id": "c", "messages": conversation})
        + "\n"
        + json.dumps({"id": "p", "prompt": "where is my parcel"})
        + "\n"
    )
    with FaultServer() as server:
        recipe = write_recipe(tmp_path, fast_retries(server.base_url, logprobs=False), tracking_uri=tracking_uri)
        assert main(["capture", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--force"]) == 0
    bodies = {b["messages"][-1]["content"]: b["messages"] for b in server.bodies}
    assert bodies[conversation[-1]["content"]] == conversation
    assert bodies["where is my parcel"] == [
        {"role": "system", "content": load_task(TASK).instructions},
        {"role": "user", "content": "where is my parcel"},
    ]
    records = {r["id"]: r for r in read_records(tmp_path / "runs")}
    assert records["c"]["messages"] == [
        *conversation,
        {"role": "assistant", "content": answer_for(conversation[-1]["content"])},
    ]
    assert records["p"]["messages"][:-1] == [{"role": "user", "content": "where is my parcel"}]
    assert records["p"]["meta"]["request"] == {"max_tokens": 4, "temperature": 0.0}
