"""Batch capture (teacher.mode=batch): provider batches at half price, resumable across restarts.

    .venv/bin/pytest tests/teachers/test_capture_batch.py -q

The other end is the loopback fault server (tests/support/fault_server.py) speaking OpenAI's Files and
Batches endpoints and Anthropic's Message Batches; the clients are the official SDKs. Batches
advance per status poll, not per second, so nothing here depends on the machine's speed.
"""

import json
import signal
import sqlite3
import subprocess
import sys
from collections import Counter

from support.capture_helpers import ROOT, fast_retries, read_records, write_prompts, write_recipe
from support.fault_server import FaultServer, answer_for
from support.waiting import wait_for

from pipeline.artifacts import read_manifest
from pipeline.cli import main

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}  # fast_retries' price; the batch rate is half
BATCH = {"input_per_mtok": 0.5, "output_per_mtok": 1.0}


def batch_teacher(server: FaultServer, **extra) -> dict:
    return fast_retries(server.base_url, mode="batch", batch_poll_s=0.02, constrain_to_labels=False, **extra)


def capture(recipe, runs, *extra: str) -> int:
    return main(["capture", str(recipe), "--runs-dir", str(runs), *extra])


def db_rows(cache, query: str) -> list[tuple]:
    with sqlite3.connect(cache) as db:
        return list(db.execute(query))


def prompts_of(server: FaultServer, n: int) -> list[str]:
    return [f"question number {i}" for i in range(n)]


def assert_answers_right(records: list[dict]) -> None:
    assert all(r["messages"][-1]["content"] == answer_for(r["messages"][0]["content"]) for r in records)


# ---------------------------------------------------------------- the guarantees


def test_sigkill_while_polling_then_rerun_submits_one_batch_and_imports_it_once(tmp_path):
    n = 20
    write_prompts(tmp_path / "prompts.jsonl", n)
    runs, cache = tmp_path / "runs", tmp_path / "cache.sqlite"
    # One request per poll, and the batch held after 3 polls: the kill always finds it in progress.
    with FaultServer(batch_step=1) as server:
        server.batch_hold_after = 3
        recipe = write_recipe(tmp_path, batch_teacher(server))
        cmd = [sys.executable, "-m", "pipeline", "capture", str(recipe), "--runs-dir", str(runs)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: server.batch_polls["batch_0001"] >= 3 or proc.poll() is not None, "capture polling its batch")
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
        assert server.batches["batch_0001"]["status"] == "in_progress"
        server.batch_hold_after = None
        assert db_rows(cache, "SELECT batch_id, state FROM batches") == [("batch_0001", "submitted")], (
            "the batch was not recorded before the capture started waiting"
        )

        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]

    assert [b["id"] for b in server.batch_log] == ["batch_0001"], "the rerun submitted the prompts again"
    assert server.total == 0, "a prompt was bought as a sync call"
    assert Counter(server.batch_answers) == Counter({p: 1 for p in prompts_of(server, n)})
    assert db_rows(cache, "SELECT count(*), count(DISTINCT key) FROM answers") == [(n, n)]
    assert db_rows(cache, "SELECT DISTINCT provenance FROM answers") == [("batch:batch_0001",)]
    records = read_records(runs)
    assert len(records) == n and {r["meta"]["provenance"] for r in records} == {"batch:batch_0001"}
    assert_answers_right(records)


def test_no_wait_submits_and_exits_then_batches_lists_it_and_a_later_capture_collects_it(tmp_path, capsys):
    n = 8
    write_prompts(tmp_path / "prompts.jsonl", n)
    runs = tmp_path / "runs"
    with FaultServer(batch_step=3) as server:
        recipe = write_recipe(tmp_path, batch_teacher(server))
        assert capture(recipe, runs, "--no-wait") == 0
        out = capsys.readouterr().out
        assert "submitted:" in out and "batch_0001" in out
        assert not (runs / "cap" / "capture" / "teacher.jsonl").exists()
        assert server.batch_polls["batch_0001"] == 0, "--no-wait waited"

        assert main(["batches", str(recipe)]) == 0
        [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("batch_0001")]
        assert "pending" in line and "in_progress" in line.split()

        assert capture(recipe, runs) == 0
        assert main(["batches", str(recipe)]) == 0
        [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("batch_0001")]
        assert "finished" in line and "completed" in line.split()
    assert len(server.batch_log) == 1 and server.total == 0
    records = read_records(runs)
    assert len(records) == n
    assert_answers_right(records)


def test_an_interrupted_create_is_found_on_the_provider_not_submitted_again(tmp_path):
    # A crash after the create request went out but before its answer was recorded: the row is
    # left `submitting` with no batch id. The rerun must find the batch by its metadata.
    write_prompts(tmp_path / "prompts.jsonl", 6)
    runs, cache = tmp_path / "runs", tmp_path / "cache.sqlite"
    with FaultServer() as server:
        recipe = write_recipe(tmp_path, batch_teacher(server))
        assert capture(recipe, runs, "--no-wait") == 0
        with sqlite3.connect(cache) as db:
            db.execute("UPDATE batches SET state = 'submitting', batch_id = NULL")
        assert capture(recipe, runs) == 0
    assert len(server.batch_log) == 1 and server.total == 0
    assert db_rows(cache, "SELECT batch_id, state FROM batches") == [("batch_0001", "imported")]


def test_budget_refuses_a_batch_whose_worst_case_exceeds_it(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl", 10)
    with FaultServer() as server:
        # One request's worst case at the batch price is ~$1.8e-4 (every prompt byte a token).
        recipe = write_recipe(tmp_path, batch_teacher(server, budget_usd=1e-4))
        assert capture(recipe, tmp_path / "runs") == 1
    err = capsys.readouterr().err
    assert "budget reached" in err and "10 prompts were not submitted" in err
    assert server.batch_log == [] and server.uploads == 0 and server.total == 0


def test_budget_is_a_ceiling_across_batches_reserving_each_batchs_worst_case(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl", 30)
    budget = 1.2e-3
    with FaultServer() as server:
        recipe = write_recipe(tmp_path, batch_teacher(server, budget_usd=budget))
        assert capture(recipe, tmp_path / "runs") == 1
        billed = server.billed_usd(**BATCH)
    assert "budget reached" in capsys.readouterr().err
    sizes = [b["requests"] for b in server.batch_log]
    # The first batch is what its worst case allows; later ones use what the real cost freed.
    assert len(sizes) >= 2 and 0 < sizes[0] < 30 and sum(sizes) < 30, sizes
    assert billed <= budget, f"the provider billed ${billed:.6f}, over the ${budget} budget"
    reserved = db_rows(tmp_path / "cache.sqlite", "SELECT reserved_usd FROM batches ORDER BY created")
    assert reserved[0][0] <= budget
    assert server.total == 0, "the budget's leftovers were bought as sync calls"


def test_failed_requests_are_retried_sync_and_ledger_card_and_mlflow_show_batch_prices(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.conversation import StudentView
    from pipeline.curation.card import render_card

    n = 20
    write_prompts(tmp_path / "prompts.jsonl", n)
    runs = tmp_path / "runs"
    with FaultServer(batch_fail=2) as server:
        recipe = write_recipe(tmp_path, batch_teacher(server, max_failure_rate=0.2))
        assert capture(recipe, runs) == 0
    failed_ids = set(server.batch_log[0]["custom_ids"][:2])
    assert server.total == 2 and len(server.batch_log) == 1, "the two failed requests go sync, once each"
    records = read_records(runs)
    assert_answers_right(records)
    batch = [r for r in records if r["meta"].get("provenance") == "batch:batch_0001"]
    sync = [r for r in records if "provenance" not in r["meta"]]
    assert len(batch) == n - 2 and len(sync) == 2
    for r in batch:  # the ledger: batch price from usage; the sync price beside it
        u = r["meta"]["usage"]
        assert abs(r["meta"]["cost_usd"] - (u["prompt_tokens"] * 0.5 + u["completion_tokens"] * 1.0) / 1e6) < 1e-12
        assert abs(r["meta"]["sync_cost_usd"] - 2 * r["meta"]["cost_usd"]) < 1e-12
    for r in sync:
        u = r["meta"]["usage"]
        assert abs(r["meta"]["cost_usd"] - (u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0) / 1e6) < 1e-12
    assert len(failed_ids) == 2

    manifest = read_manifest(runs / "cap" / "capture")
    paid = sum(r["meta"]["cost_usd"] for r in batch)
    assert abs(manifest.metrics["batch_cost_usd"] - paid) < 1e-12
    assert abs(manifest.metrics["batch_saved_usd"] - paid) < 1e-12  # half price: saved as much as paid
    assert manifest.counts["batch_failed"] == 2 and manifest.counts["teacher_calls"] == 2
    assert any("batch price $0.5/$1.0 per 1M tokens" in note for note in manifest.notes)

    card = render_card(
        task_name="t",
        raw=records,
        steps=[],
        labels_before=Counter(),
        splits={"train": [], "validation": [], "test": []},
        pii_counts=None,
        figures=[],
        notes=[],
        view=StudentView("user", "auto", 1, None, "auto: no system prompt"),
    )
    assert f"{n - 2} answers came from provider batches at ${paid:.4f}" in card
    assert f"saved ${paid:.4f} (50%)" in card

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs(
        [client.get_experiment_by_name("capture-tests").experiment_id], filter_string="tags.mlflow.runName = 'capture'"
    )
    assert abs(run.data.metrics["batch_saved_usd"] - paid) < 1e-12


def test_too_many_failures_stop_without_sync_calls_and_the_rerun_sends_a_follow_up_batch(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl", 10)
    runs = tmp_path / "runs"
    with FaultServer(batch_fail=5) as server:
        recipe = write_recipe(tmp_path, batch_teacher(server))  # max_failure_rate 2%
        assert capture(recipe, runs) == 1
        assert "5 of 10 batch requests failed" in capsys.readouterr().err
        assert server.total == 0
        assert capture(recipe, runs) == 0
    first, follow_up = server.batch_log
    assert follow_up["custom_ids"] == first["custom_ids"][:5], "the follow-up batch is exactly the failed requests"
    assert server.total == 0 and len(read_records(runs)) == 10


def test_an_expired_batch_keeps_what_finished_and_resubmits_only_the_rest(tmp_path):
    n = 20
    write_prompts(tmp_path / "prompts.jsonl", n)
    runs = tmp_path / "runs"
    with FaultServer(batch_step=4, batch_expire_at=0.5) as server:
        recipe = write_recipe(tmp_path, batch_teacher(server))
        assert capture(recipe, runs) == 0
    first, second = server.batch_log
    assert server.batches[first["id"]]["status"] == "expired"
    assert second["custom_ids"] == first["custom_ids"][n // 2 :]
    assert Counter(server.batch_answers) == Counter({p: 1 for p in prompts_of(server, n)}), "an answer was bought twice"
    assert server.total == 0
    assert_answers_right(read_records(runs))


def test_a_5xx_on_upload_is_retried_and_submits_once(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 5)
    with FaultServer(upload_failures=2) as server:
        recipe = write_recipe(tmp_path, batch_teacher(server))
        assert capture(recipe, tmp_path / "runs") == 0
    assert server.uploads == 3 and len(server.batch_log) == 1 and server.total == 0


def test_batches_above_the_size_limit_are_split(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 10)
    with FaultServer() as server:
        recipe = write_recipe(tmp_path, batch_teacher(server, batch_max_requests=4))
        assert capture(recipe, tmp_path / "runs") == 0
    assert [b["requests"] for b in server.batch_log] == [4, 4, 2]
    ids = [c for b in server.batch_log for c in b["custom_ids"]]
    assert len(set(ids)) == 10 and len(read_records(tmp_path / "runs")) == 10


def test_anthropic_message_batches_cancel_keeps_what_finished_and_the_next_run_resubmits_the_rest(tmp_path, capsys):
    n = 10
    write_prompts(tmp_path / "prompts.jsonl", n)
    runs = tmp_path / "runs"
    with FaultServer(batch_step=3) as server:
        teacher = {
            **batch_teacher(server),
            "spec": "anthropic:claude-3-5-haiku",
            "base_url": f"http://127.0.0.1:{server.port}",
        }
        recipe = write_recipe(tmp_path, teacher)
        assert capture(recipe, runs, "--no-wait") == 0
        assert main(["batches", str(recipe)]) == 0  # refreshes its status: the server runs 3 requests
        assert main(["batches", str(recipe), "--cancel", "msgbatch_0001"]) == 0
        assert "msgbatch_0001: canceling" in capsys.readouterr().out
        assert capture(recipe, runs) == 1
        assert "was cancelled" in capsys.readouterr().err
        assert capture(recipe, runs) == 0
    first, second = server.batch_log
    assert second["custom_ids"] == first["custom_ids"][3:], "only what the cancelled batch had not run"
    assert Counter(server.batch_answers) == Counter({p: 1 for p in prompts_of(server, n)})
    records = read_records(runs)
    assert {r["meta"]["provenance"] for r in records} == {"batch:msgbatch_0001", "batch:msgbatch_0002"}
    assert_answers_right(records)


def test_the_api_key_is_never_stored_in_the_cache_or_the_records(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCH_TEST_KEY", "sk-batch-secret-0123456789abcdef")
    write_prompts(tmp_path / "prompts.jsonl", 3)
    with FaultServer() as server:
        recipe = write_recipe(tmp_path, batch_teacher(server, api_key_env="BATCH_TEST_KEY"))
        assert capture(recipe, tmp_path / "runs") == 0
    stored = (
        b"".join(p.read_bytes() for p in tmp_path.glob("cache.sqlite*"))
        + (tmp_path / "runs" / "cap" / "capture" / "teacher.jsonl").read_bytes()
    )
    assert b"sk-batch-secret" not in stored
    assert json.loads((tmp_path / "runs" / "cap" / "capture" / "teacher.jsonl").read_text().splitlines()[0])
