"""The router's record logs (pipeline/router/record_log.py) never lose, corrupt or leak a record
(`make test`): rotation never overwrites, a torn last line is dealt with, files are 0600, personal
data is scrubbed before writing, and a full disk never turns a paid answer into a 500.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from support.fault_server import FaultServer, answer_for
from support.router_helpers import MODEL, teacher_for

from pipeline.artifacts import read_jsonl
from pipeline.llm.policy import Policy

PII = (
    "my card is 4111 1111 1111 1111, mail me at jo.doe@example.com, and here is our key "
    "sk-proj-AbCdEf0123456789AbCdEf0123456789xyz"
)


def record(n: int, text: str = "the parcel arrived broken") -> dict:
    return {
        "id": f"r{n}",
        "messages": [{"role": "user", "content": f"{text} #{n}"}, {"role": "assistant", "content": "damaged"}],
        "meta": {"source": "router", "teacher": "openai:t", "prompt_sha": "abc"},
    }


def every_record(folder: Path) -> list[dict]:
    return [r for path in sorted(folder.glob("*.jsonl")) for r in read_jsonl(path)]


def test_rotations_never_overwrite_one_another(tmp_path):
    from pipeline.router.record_log import RecordLog

    log = RecordLog(tmp_path / "escalations.jsonl", rotate_bytes=300)
    for n in range(12):
        assert log.append(record(n))
    assert len(log.rotated) >= 3 and len(set(log.rotated)) == len(log.rotated)
    assert all(p.name.startswith("escalations-") and p.suffix == ".jsonl" for p in log.rotated)
    assert sorted(r["id"] for r in every_record(tmp_path)) == sorted(f"r{n}" for n in range(12))


def test_a_torn_last_line_is_cut_off_or_completed_and_the_file_reads_again(tmp_path):
    from pipeline.router.record_log import RecordLog

    path = tmp_path / "escalations.jsonl"
    whole = json.dumps(record(1)) + "\n" + json.dumps(record(2)) + "\n"
    path.write_text(whole + json.dumps(record(3))[:40])  # the server died mid-write
    log = RecordLog(path)
    assert log.torn == 1 and log.append(record(4))
    assert [r["id"] for r in read_jsonl(path)] == ["r1", "r2", "r4"]

    path.write_text(whole + json.dumps(record(3)))  # died after the record, before its newline
    log = RecordLog(path)
    assert log.torn == 1 and log.append(record(4))
    assert [r["id"] for r in read_jsonl(path)] == ["r1", "r2", "r3", "r4"]
    assert RecordLog(path).torn == 0


def test_the_log_is_owner_only(tmp_path):
    from pipeline.router.record_log import RecordLog

    fresh = RecordLog(tmp_path / "new.jsonl")
    fresh.append(record(1))
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps(record(0)) + "\n")
    old.chmod(0o644)
    RecordLog(old).append(record(1))
    rotating = RecordLog(tmp_path / "rot.jsonl", rotate_bytes=10)
    rotating.append(record(1))
    rotating.append(record(2))
    for path in [fresh.path, old, rotating.path, *rotating.rotated]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


@pytest.mark.parametrize("scrub", [True, False])
def test_personal_data_is_scrubbed_before_it_is_written(tmp_path, scrub):
    from pipeline.router.record_log import RecordLog

    log = RecordLog(tmp_path / "escalations.jsonl", scrub_pii=scrub)
    log.append(record(1, PII))
    text = log.path.read_text()
    leaked = [s for s in ("4111 1111 1111 1111", "jo.doe@example.com", "sk-proj-AbCdEf") if s in text]
    if scrub:
        assert leaked == [] and "[CARD]" in text and "[EMAIL]" in text and "[SECRET]" in text
        assert log.scrubbed == {"card": 1, "email": 1, "secret": 1}
        assert read_jsonl(log.path)[0]["meta"]["prompt_sha"] == "abc"  # identifiers untouched
    else:
        assert len(leaked) == 3


def test_a_full_disk_is_counted_and_never_raises():
    from pipeline.router.record_log import RecordLog

    log = RecordLog(Path("/dev/full"))  # every write there fails with ENOSPC
    assert log.append(record(1)) is False
    assert log.failed == 1 and log.written == 0


def test_a_full_disk_does_not_turn_a_paid_answer_into_a_500(tmp_path):
    import httpx
    from support.router_helpers import FixedStudent, running

    from pipeline.router.app import create_app
    from pipeline.router.escalations import EscalationLog
    from pipeline.router.settings import ServeSettings

    with FaultServer() as server:
        app = create_app(
            ServeSettings(max_tokens=8),
            {MODEL: FixedStudent()},
            Policy(threshold=0.0),
            teacher=teacher_for(server),
            escalations=EscalationLog(Path("/dev/full")),
        )
        with running(app) as url:
            reply = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "paid for"}]},
            )
            metrics = httpx.get(f"{url}/metrics").text
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == answer_for("paid for")
    assert 'distill_log_write_failures{log="escalations"} 1.0' in metrics
    assert server.requests["paid for"] == 1


def test_escalations_are_scrubbed_in_the_served_log_and_still_import(tmp_path):
    import httpx
    from support.router_helpers import FixedStudent, running

    from pipeline.router.app import create_app
    from pipeline.router.escalations import EscalationLog
    from pipeline.router.settings import ServeSettings
    from pipeline.teachers.logs import import_logs

    path = tmp_path / "escalations.jsonl"
    with FaultServer() as server:
        app = create_app(
            ServeSettings(max_tokens=8),
            {MODEL: FixedStudent()},
            Policy(threshold=0.0),
            teacher=teacher_for(server),
            escalations=EscalationLog(path),
        )
        with running(app) as url:
            assert (
                httpx.post(
                    f"{url}/v1/chat/completions",
                    json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": PII}]},
                ).status_code
                == 200
            )
    assert "4111" not in path.read_text() and "sk-proj" not in path.read_text()
    imported = import_logs(path, "prompt", "label")
    assert not imported.rejected and "[CARD]" in imported.records[0].messages[-1]["content"]
