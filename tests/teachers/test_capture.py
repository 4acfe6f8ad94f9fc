"""Capture against a fault-injecting loopback server: retries, budget, auth, failures, logs: import;
and the teacher service, registry and protocol that capture, the judge and the router share.

    .venv/bin/pytest tests/teachers/test_capture.py -q

Capture goes through the real CLI (`distill capture RECIPE --force`), the real runner and a
real MLflow store; the service through its public API. The only stand-in is the HTTP server
on the other end (tests/support/fault_server.py).
"""

import ast
import asyncio
import csv
import inspect
import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from support.capture_helpers import TASK, fast_retries, read_records, write_prompts, write_recipe
from support.fault_server import FAULTS, FaultServer, answer_for

import pipeline.stages.capture as capture_stage
import pipeline.teachers.anthropic as anthropic_teacher
from pipeline.artifacts import read_manifest
from pipeline.cli import main
from pipeline.config import CaptureConfig, Recipe, TeacherConfig
from pipeline.errors import DistillError
from pipeline.prices import load_price_table, lookup_price
from pipeline.stages.capture import load_prompts
from pipeline.teachers import PROVIDERS, TEACHERS, Teacher, TeacherAuthError, build_teacher
from pipeline.teachers.service import NOT_SENT, TeacherService


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the module: creating a store costs seconds, a run in it does not."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def run_capture(recipe: Path, runs: Path, *overrides: str) -> int:
    return main(["capture", str(recipe), *overrides, "--runs-dir", str(runs), "--force"])


def cached_costs(folder: Path) -> list[float]:
    with sqlite3.connect(folder / "cache.sqlite") as db:
        return [row[0] for row in db.execute("SELECT json_extract(completion, '$.cost_usd') FROM answers")]


# ---------------------------------------------------------------- faults and retries


def test_faults_200_prompts_give_200_records_each_paid_once(tmp_path, tracking_uri):
    write_prompts(tmp_path / "prompts.jsonl", 200)
    runs = tmp_path / "runs"
    # timeout_s is well above a normal answer's time on a busy 2-core machine: a spurious timeout
    # after the server answered would be a second payment, in real life as here.
    with FaultServer(fault_rate=0.2, slow_s=2.5, retry_after="0.05") as server:
        recipe = write_recipe(tmp_path, fast_retries(server.base_url, timeout_s=1.2), tracking_uri=tracking_uri)
        assert run_capture(recipe, runs) == 0
        assert set(server.faulted) == set(FAULTS), "every kind of fault was injected"
        assert len(server.successes) == 200 and max(server.successes.values()) == 1, "a prompt was paid twice"

        records = read_records(runs)
        assert len(records) == 200 and len({r["id"] for r in records}) == 200
        assert all(r["meta"]["error"] is None for r in records)
        assert all(r["messages"][-1]["content"] == answer_for(r["messages"][0]["content"]) for r in records)
        assert all(r["meta"]["usage"]["prompt_tokens"] > 0 and r["meta"]["logprobs"] == -0.5 for r in records)
        assert all(r["meta"]["token_logprobs"] == [-0.25, -0.75] for r in records), "per-token logprobs kept"
        manifest = read_manifest(runs / "cap" / "capture")
        assert manifest.counts["ok"] == 200 and manifest.counts["failed"] == 0
        assert manifest.counts["retries"] >= sum(server.faulted.values())
        assert manifest.cost_usd == pytest.approx(sum(r["meta"]["cost_usd"] for r in records))
        assert manifest.cost_usd == pytest.approx(sum(cached_costs(tmp_path)))

        before = server.total
        assert run_capture(recipe, runs) == 0
        assert server.total == before, "a second run called the teacher"
        again = read_manifest(runs / "cap" / "capture")
        assert again.counts["cache_hits"] == 200 and again.counts["teacher_calls"] == 0 and again.cost_usd == 0


def test_retry_after_is_honoured(tmp_path, tracking_uri):
    write_prompts(tmp_path / "prompts.jsonl", 1)
    with FaultServer(plan={1: "429"}, retry_after="0.6") as server:
        recipe = write_recipe(tmp_path, fast_retries(server.base_url, backoff_max_s=5), tracking_uri=tracking_uri)
        assert run_capture(recipe, tmp_path / "runs") == 0
    [(first, second)] = server.times.values()
    assert second - first >= 0.55, "retried before the server's Retry-After"


def test_requests_per_minute_limit_spaces_calls(tmp_path, tracking_uri):
    write_prompts(tmp_path / "prompts.jsonl", 8)
    with FaultServer() as server:
        # rpm=60 over 6 s windows: 6 calls at once, then one a second.
        recipe = write_recipe(tmp_path, fast_retries(server.base_url, rpm=60), tracking_uri=tracking_uri)
        assert run_capture(recipe, tmp_path / "runs") == 0
    starts = sorted(t for times in server.times.values() for t in times)
    assert len(starts) == 8 and starts[-1] - starts[0] >= 1.5


# ---------------------------------------------------------------- budget


def test_budget_stops_before_exceeding_it_and_a_higher_budget_resumes(tmp_path, tracking_uri, capsys):
    write_prompts(tmp_path / "prompts.jsonl", 40)
    runs = tmp_path / "runs"
    budget = 0.002  # about 15 calls at $1.08e-4 each, reserving $4.3e-4 (the worst case) per call
    with FaultServer() as server:
        recipe = write_recipe(tmp_path, fast_retries(server.base_url, budget_usd=budget), tracking_uri=tracking_uri)
        assert run_capture(recipe, runs) == 1
        err = capsys.readouterr().err
        assert "budget reached" in err and "rerun with a higher teacher.budget_usd" in err
        paid = sum(server.successes.values())
        assert 0 < paid < 40 and f"{paid}/40 answers bought" in err
        assert len(cached_costs(tmp_path)) == paid and sum(cached_costs(tmp_path)) <= budget
        assert read_manifest(runs / "cap" / "capture") is None, "a budget-stopped capture must not look complete"

        assert run_capture(recipe, runs) == 1, "the same budget again must buy nothing more"
        assert sum(server.successes.values()) == paid

        assert run_capture(recipe, runs, "teacher.budget_usd=1") == 0
        assert len(server.successes) == 40 and max(server.successes.values()) == 1
    manifest = read_manifest(runs / "cap" / "capture")
    assert manifest.counts["cache_hits"] == paid and manifest.counts["teacher_calls"] == 40 - paid
    assert manifest.metrics["cost_usd_prompt_set"] == pytest.approx(sum(cached_costs(tmp_path)))


def test_unknown_model_needs_a_price(tmp_path, tracking_uri, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-unused")
    write_prompts(tmp_path / "prompts.jsonl", 2)
    # Not loopback (a loopback server defaults to $0); the price check fails before any call.
    teacher = {"spec": "openai:my-private-model", "base_url": "https://gateway.example.com/v1"}
    recipe = write_recipe(tmp_path, teacher, tracking_uri=tracking_uri)
    assert run_capture(recipe, tmp_path / "runs") == 1
    assert "teacher.price.input_per_mtok" in capsys.readouterr().err


def test_price_table_resolves_dated_snapshots():
    table = load_price_table()
    assert lookup_price("openai", "gpt-4o-mini-2024-07-18", table) == lookup_price("openai", "gpt-4o-mini", table)
    assert lookup_price("anthropic", "claude-3-5-haiku-latest", table).input_per_mtok > 0
    assert lookup_price("openai", "gpt-4o-mini-turbo", table) is None


# ---------------------------------------------------------------- errors


def test_auth_error_stops_at_once_and_never_shows_the_key(tmp_path, tracking_uri, capsys, caplog, monkeypatch):
    key = "sk-test-abcdefghijklmnop"
    monkeypatch.setenv("CAPTURE_TEST_KEY", key)
    write_prompts(tmp_path / "prompts.jsonl", 20)
    with FaultServer(status=401) as server:
        teacher = fast_retries(server.base_url, api_key_env="CAPTURE_TEST_KEY")
        recipe = write_recipe(tmp_path, teacher, tracking_uri=tracking_uri, name="auth")
        assert run_capture(recipe, tmp_path / "runs") == 1
    assert server.total == 1, "an auth error was retried or fanned out"
    out = capsys.readouterr()
    seen = out.out + out.err + caplog.text
    assert "HTTP 401" in seen and "sk-test" not in seen

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("capture-tests")
    for run in client.search_runs([experiment.experiment_id], filter_string="tags.mlflow.runName = 'auth'"):
        assert "sk-test" not in json.dumps(run.data.params)


def test_identity_and_repr_never_hold_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-0123456789abcdef")
    teacher = build_teacher("openai:gpt-4o-mini", Recipe(name="x").teacher)
    assert "sk-live" not in json.dumps(teacher.identity()) + repr(teacher)


def test_failed_calls_are_recorded_not_cached_and_retried_next_run(tmp_path, tracking_uri):
    write_prompts(tmp_path / "prompts.jsonl", 10)
    runs = tmp_path / "runs"
    with FaultServer(plan={1: "500"}) as server:  # the first call (sent alone) fails; no retries allowed
        # Unconstrained: a 500 on the first call with a response_format would be read as refusing it.
        teacher = fast_retries(server.base_url, max_retries=0, max_failure_rate=0.2, constrain_to_labels=False)
        recipe = write_recipe(tmp_path, teacher, tracking_uri=tracking_uri)
        assert run_capture(recipe, runs) == 0
        records = read_records(runs)
        failed = [r for r in records if r["meta"]["error"]]
        assert len(records) == 10 and len(failed) == 1 and "HTTP 500" in failed[0]["meta"]["error"]
        counts = read_manifest(runs / "cap" / "capture").counts
        assert (counts["ok"], counts["failed"]) == (9, 1)

        assert run_capture(recipe, runs) == 0
        assert server.total == 11, "only the failed prompt is asked again"
        assert all(r["meta"]["error"] is None for r in read_records(runs))


def test_too_many_failures_fail_the_stage(tmp_path, tracking_uri, capsys):
    write_prompts(tmp_path / "prompts.jsonl", 10)
    with FaultServer(fault_rate=1.0, faults=("500",)) as server:
        # Unconstrained: on the first call a 500 to a response_format also tries the next shape.
        teacher = fast_retries(server.base_url, max_retries=1, max_failure_rate=0.1, constrain_to_labels=False)
        recipe = write_recipe(tmp_path, teacher, tracking_uri=tracking_uri)
        assert run_capture(recipe, tmp_path / "runs") == 1
        assert server.total == 20, "each call is tried once plus one retry"
    assert "10 of 10 teacher calls failed after retries" in capsys.readouterr().err


def test_server_without_logprobs_is_asked_once_then_not_again(tmp_path, tracking_uri):
    write_prompts(tmp_path / "prompts.jsonl", 5)
    runs = tmp_path / "runs"
    with FaultServer(reject_logprobs=True) as server:
        recipe = write_recipe(tmp_path, fast_retries(server.base_url), tracking_uri=tracking_uri)
        assert run_capture(recipe, runs) == 0
        assert sum(1 for body in server.bodies if body.get("logprobs")) == 1
    assert all(r["meta"]["logprobs"] is None and r["meta"]["error"] is None for r in read_records(runs))
    assert any("refused logprobs" in note for note in read_manifest(runs / "cap" / "capture").notes)


# ---------------------------------------------------------------- providers and sampling


def test_anthropic_teacher_sends_the_system_prompt_apart_and_is_priced(tmp_path, tracking_uri):
    pytest.importorskip("anthropic", reason="the anthropic SDK is not installed")
    write_prompts(tmp_path / "prompts.jsonl", 3)
    runs = tmp_path / "runs"
    with FaultServer() as server:
        teacher = {
            "spec": "anthropic:claude-3-5-haiku-20241022",
            "base_url": f"http://127.0.0.1:{server.port}",
            "timeout_s": 5,
        }
        recipe = write_recipe(tmp_path, teacher, tracking_uri=tracking_uri)
        assert run_capture(recipe, runs) == 0
        body = server.bodies[-1]
    instructions = yaml.safe_load(TASK.read_text())["instructions"]
    assert body["system"] == instructions and all(m["role"] != "system" for m in body["messages"])
    records = read_records(runs)
    usage = records[0]["meta"]["usage"]
    assert records[0]["messages"][-1]["content"] == answer_for("question number 0")
    assert records[0]["meta"]["cost_usd"] == pytest.approx(
        (usage["prompt_tokens"] * 0.8 + usage["completion_tokens"] * 4.0) / 1e6
    )


def test_n_samples_per_prompt_are_separate_calls_and_records(tmp_path, tracking_uri):
    write_prompts(tmp_path / "prompts.jsonl", 4)
    runs = tmp_path / "runs"
    with FaultServer() as server:
        recipe = write_recipe(tmp_path, fast_retries(server.base_url, n=3, temperature=0.7), tracking_uri=tracking_uri)
        assert run_capture(recipe, runs) == 0
        assert sorted(server.requests.values()) == [3, 3, 3, 3]
    records = read_records(runs)
    assert [r["id"] for r in records[:3]] == ["q0000#0", "q0000#1", "q0000#2"]
    assert [r["meta"]["sample"] for r in records[:3]] == [0, 1, 2] and len(records) == 12


def test_n_above_one_needs_temperature(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl", 1)
    recipe = write_recipe(tmp_path, {"n": 2})
    assert main(["validate", str(recipe)]) == 1
    assert "teacher.temperature > 0" in capsys.readouterr().err


# ---------------------------------------------------------------- inputs


def test_prompts_from_csv_parquet_and_a_dataset_folder_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "text": "first"}, {"id": "b", "text": "second"}]
    with open(tmp_path / "p.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "text"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "dataset"  # anything else goes through datasets.load_dataset
    folder.mkdir()
    (folder / "train.jsonl").write_text((tmp_path / "p.jsonl").read_text())
    cfg = CaptureConfig(prompt_field="text")
    sources = [tmp_path / "p.csv", tmp_path / "p.parquet", tmp_path / "p.jsonl", folder]
    loaded = [[(p["id"], p["messages"][0]["content"]) for p in load_prompts(source, cfg)[0]] for source in sources]
    assert all(rows == [("a", "first"), ("b", "second")] for rows in loaded)


def test_bad_prompt_lines_are_named_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"prompt": "cut off\n')
    with pytest.raises(DistillError, match=r"bad.jsonl:3: invalid JSON"):
        load_prompts(bad, CaptureConfig())
    bad.write_text('{"prompt": "ok"}\n{"text": "wrong field"}\n')
    with pytest.raises(DistillError, match=r"bad.jsonl:2: no 'prompt' text"):
        load_prompts(bad, CaptureConfig())


def test_logs_import_chat_jsonl_rejects_records_without_an_answer(tmp_path, tracking_uri, caplog):
    good = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "where is my parcel"},
            {"role": "assistant", "content": "track_order"},
        ]
    }
    no_answer = {"messages": [{"role": "user", "content": "hello"}]}
    empty_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    log = tmp_path / "chat.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [good, no_answer, good, empty_answer]) + "\n")
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path, {"spec": f"logs:{log}"}, tracking_uri=tracking_uri)
    assert run_capture(recipe, runs) == 0
    records = read_records(runs)
    assert [r["messages"] for r in records] == [good["messages"]] * 2  # the system prompt kept
    assert all(r["meta"]["source"] == "logs" and r["meta"]["cost_usd"] == 0 for r in records)
    manifest = read_manifest(runs / "cap" / "capture")
    assert manifest.counts["rejected"] == 2 and manifest.counts["teacher_calls"] == 0
    assert any(f"{log}:2" in note and f"{log}:4" in note for note in manifest.notes)


def test_logs_import_csv_with_named_columns(tmp_path, tracking_uri):
    log = tmp_path / "support.csv"
    with open(log, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["message", "intent", "gold"])
        writer.writerow(["my card was declined", "payment_failed", "payment_failed"])
        writer.writerow(["reset my password\nplease", "password_reset", ""])
        writer.writerow(["no label here", "", ""])
    runs = tmp_path / "runs"
    teacher = {"spec": f"logs:{log}", "prompt_col": "message", "label_col": "intent"}
    recipe = write_recipe(tmp_path, teacher, tracking_uri=tracking_uri)
    assert run_capture(recipe, runs) == 0
    records = read_records(runs)
    assert [r["messages"][-1]["content"] for r in records] == ["payment_failed", "password_reset"]
    assert records[0]["meta"]["gold"] == "payment_failed"
    notes = read_manifest(runs / "cap" / "capture").notes
    assert any(f"{log}:5 (no 'intent')" in note for note in notes), notes  # line 5: the quoted newline counts


def test_logs_with_no_usable_record_fail(tmp_path, tracking_uri, capsys):
    log = tmp_path / "chat.jsonl"
    log.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    recipe = write_recipe(tmp_path, {"spec": f"logs:{log}"}, tracking_uri=tracking_uri)
    assert run_capture(recipe, tmp_path / "runs") == 1
    assert f"{log}:1" in capsys.readouterr().err


# ---------------------------------------------------------------- the teacher service


def service_cfg(base_url: str, **extra) -> TeacherConfig:
    return TeacherConfig(**{**fast_retries(base_url), "max_new_tokens": 4, **extra})


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_service_answers_from_cache_without_asking_the_teacher_again(tmp_path):
    with FaultServer() as server:
        # concurrency=1 makes later calls queue for the slot, which ties asyncio primitives to
        # an event loop: the second answer_sync (a new loop) must not trip over the first's.
        cfg = service_cfg(server.base_url, concurrency=1)
        service = TeacherService.from_config(cfg, tmp_path / "cache.sqlite")
        first = service.answer_sync([user("a"), user("b"), user("a"), user("c")])
        more = service.answer_sync([user("d"), user("e"), user("f")])
        service.close()
        assert server.total == 6, "a prompt asked twice in one batch was paid twice"
        assert [c.text for c in first + more] == [answer_for(p) for p in "abacdef"]
        assert service.report.calls == 6 and service.report.cache_hits == 0

        again = TeacherService.from_config(cfg, tmp_path / "cache.sqlite")
        second = again.answer_sync([user("c"), user("a"), user("f")])
        again.close()
        assert server.total == 6, "a cached answer was bought again"
    assert [(c.text, c.cost_usd) for c in second] == [(c.text, c.cost_usd) for c in (first[3], first[0], more[2])]
    report = again.report
    assert (report.asked, report.cache_hits, report.calls, report.spent_usd) == (3, 3, 0, 0.0)
    assert report.total_usd == pytest.approx(sum(c.cost_usd for c in second)), "cached answers count in the budget"


def test_concurrent_answer_calls_pay_once_per_distinct_prompt():
    async def ask(service: TeacherService) -> list[list]:
        try:
            return await asyncio.gather(
                service.answer([user("x"), user("y")]),
                service.answer([user("y"), user("z")]),
                *(service.answer([user("x")]) for _ in range(5)),
            )
        finally:
            await service.aclose()

    # Slow answers: every call is still in flight when the other callers ask for the same prompt.
    with FaultServer(latency_s=0.3) as server:
        service = TeacherService.from_config(service_cfg(server.base_url), ":memory:")
        results = asyncio.run(ask(service))
    assert dict(server.requests) == {"x": 1, "y": 1, "z": 1}
    assert [[c.text for c in r] for r in results[:2]] == [
        [answer_for("x"), answer_for("y")],
        [answer_for("y"), answer_for("z")],
    ]
    assert all(r[0].text == answer_for("x") and r[0].error is None for r in results[2:])
    report = service.report
    assert (report.asked, report.calls, report.joined, report.cache_hits) == (9, 3, 6, 0)
    assert report.spent_usd == pytest.approx(sum(c.cost_usd for c in [*results[0], results[1][1]]))


def test_an_auth_error_reaches_every_caller_waiting_on_that_call():
    async def ask(service: TeacherService) -> list:
        try:
            return await asyncio.gather(
                service.answer([user("x")]), service.answer([user("x")]), return_exceptions=True
            )
        finally:
            await service.aclose()

    with FaultServer(status=401) as server:
        service = TeacherService.from_config(service_cfg(server.base_url), ":memory:")
        results = asyncio.run(ask(service))
    assert server.total == 1
    assert all(isinstance(r, TeacherAuthError) for r in results), results


def test_a_caller_waiting_on_a_cancelled_call_asks_again_itself():
    async def ask(service: TeacherService):
        try:
            buyer = asyncio.create_task(service.answer([user("x")]))
            await asyncio.sleep(0.1)  # the buyer's call is in flight
            waiter = asyncio.create_task(service.answer([user("x")]))
            await asyncio.sleep(0.1)
            buyer.cancel()  # a router client that hung up
            return await waiter
        finally:
            await service.aclose()

    with FaultServer(latency_s=0.5) as server:
        service = TeacherService.from_config(service_cfg(server.base_url), ":memory:")
        [answer] = asyncio.run(ask(service))
    assert answer.text == answer_for("x") and answer.error is None
    assert server.requests["x"] == 2


def test_service_returns_unsent_prompts_as_errors_when_the_budget_runs_out():
    with FaultServer() as server:
        # One call reserves $1.7e-5 (9 prompt tokens at most, 4 out) and costs $7e-6: after
        # it, a second reservation would cross $2e-5.
        service = TeacherService.from_config(service_cfg(server.base_url, budget_usd=2e-5), ":memory:")
        answers = service.answer_sync([user("a"), user("b"), user("c")])
        service.close()
    assert server.total == 1
    assert answers[0].error is None and [c.error for c in answers[1:]] == [NOT_SENT, NOT_SENT]
    report = service.report
    assert report.budget_stop and (report.ok, report.not_sent) == (1, 2)
    assert report.spent_usd == pytest.approx(answers[0].cost_usd) and report.spent_usd <= 2e-5


def test_local_teacher_service_generates_in_batches_then_answers_from_cache(tmp_path):
    cfg = TeacherConfig(spec="local:embedded:smollm2-135m-instruct", max_new_tokens=3, batch_size=2)
    conversations = [user(f"Say the word {word}.") for word in ("one", "two", "three")]
    service = TeacherService.from_config(cfg, tmp_path / "cache.sqlite")
    first = service.answer_sync(conversations)
    service.close()
    report = service.report
    assert (report.calls, report.ok, report.retries, report.metered, report.spent_usd) == (3, 3, 0, False, 0.0)
    assert all(c.error is None and c.source == cfg.spec and 1 <= c.completion_tokens <= 3 for c in first)

    again = TeacherService.from_config(cfg, tmp_path / "cache.sqlite")
    second = again.answer_sync(conversations)
    again.close()
    assert (again.report.cache_hits, again.report.calls) == (3, 0)
    assert [c.text for c in second] == [c.text for c in first]


# ---------------------------------------------------------------- registry and protocol


@pytest.mark.parametrize(
    "spec", ["local:embedded:smollm2-135m-instruct", "openai:gpt-4o-mini", "anthropic:claude-3-5-haiku-latest"]
)
def test_registry_builds_every_provider_with_the_whole_protocol(spec, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    provider = spec.partition(":")[0]
    teacher = build_teacher(spec, TeacherConfig(), labels=["yes", "no"])
    assert type(teacher) is TEACHERS[provider] and isinstance(teacher, Teacher)
    assert teacher.spec == spec and teacher.identity()["provider"] == provider and teacher.notes == []
    assert teacher.in_process is (provider == "local")
    assert (teacher.price is None) is (provider == "local"), "a network teacher from prices.yaml has a price"
    for name in ("complete", "complete_batch", "aclose"):
        assert inspect.iscoroutinefunction(getattr(type(teacher), name)), name
    asyncio.run(teacher.aclose())  # nothing was opened: closing is a no-op, not an error


def test_registry_knows_every_provider_and_refuses_the_rest():
    assert set(PROVIDERS) == {*TEACHERS, "logs"}
    with pytest.raises(DistillError, match="imports answers"):
        build_teacher("logs:chat.jsonl", TeacherConfig())
    with pytest.raises(DistillError, match="known: local, openai, anthropic, logs"):
        build_teacher("ollama:llama3", TeacherConfig())


def imported_modules(module) -> set[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    names = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return names | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def test_anthropic_teacher_imports_nothing_from_the_openai_provider():
    assert not [name for name in imported_modules(anthropic_teacher) if "openai" in name]


def test_capture_asks_through_the_service_without_provider_branches():
    tree = ast.parse(Path(capture_stage.__file__).read_text())
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert "getattr" not in called and not strings & set(TEACHERS)
    assert not [
        name
        for name in imported_modules(capture_stage)
        if name.startswith("pipeline.teachers.") and name.rsplit(".", 1)[1] in ("cache", "dispatch", "ledger")
    ]


def test_concurrent_calls_that_settled_on_different_response_formats_keep_the_later_one():
    """Two calls in flight when the server refused json_schema: one settles on json_object, then the
    other, which had got through with json_schema, settles too; the teacher keeps json_object."""
    from pipeline.teachers.openai_compat import Asking

    asking = Asking(schema_modes=("json_schema", "json_object", None), logprobs=False)
    assert asking.settle(("json_object", False)) == [
        "the server refused response_format json_schema; using json_object"
    ]
    assert asking.settle(("json_schema", False)) == []
    assert asking.schema_modes == ("json_object", None) and asking.ladder() == [("json_object", False)]
