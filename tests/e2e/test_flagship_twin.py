"""The flagship recipe (recipes/mistral7b.yaml: Mistral-7B QLoRA on Banking77 imported as logs) and
its CPU twin: the same recipe with the embedded SmolLM2 student, LoRA instead of QLoRA and tiny
sizes, run end to end on a small CSV of the published file's shape (text,category): captured,
curated, trained, evaluated with confidence intervals, exported (merged, adapter, GGUF) and served.
The published CSV itself is fetched on first use (`teachers/sources.fetch`), rehearsed here against
a loopback HTTP server, never the internet.

    .venv/bin/pytest -q tests/e2e/test_flagship_twin.py
"""

import csv
import functools
import json
import random
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_recipe
from pipeline.task import load_task

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BANKING77_CSV = "https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/master/banking_data/train.csv"
LABELS = 8  # of the 77 intents, 12 queries each: 96 rows
WORDS = (
    "card arrived never still waiting account money transfer pending fee charged twice refund app phone lost "
    "stolen pin blocked top up failed cash machine exchange rate euro dollar verify identity apple pay virtual "
    "disposable limit declined beneficiary receive salary statement contactless expire replace order cancel "
    "direct debit cheque deposit balance update country support age passcode forgot spare weekend"
).split()


def banking77_shaped_csv(path: Path) -> Path:
    """Queries of varied words (so dedup keeps them) for 8 of the task's intents, in the file's columns."""
    labels = load_task(ROOT / "data" / "banking77_task.yaml").labels[:LABELS]
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        for label in labels:
            for _ in range(12):
                writer.writerow([" ".join(rng.sample(WORDS, 9)) + f", {label.replace('_', ' ')}?", label])
    return path


def test_the_flagship_is_mistral7b_qlora_on_banking77_from_its_published_csv():
    recipe = load_recipe("mistral7b", root=ROOT)
    assert recipe.model.base == "mistralai/Mistral-7B-Instruct-v0.3"
    assert recipe.train.method == "qlora" and recipe.train.quant.load_in_4bit
    assert recipe.teacher.spec == f"logs:{BANKING77_CSV}"
    assert (recipe.teacher.prompt_col, recipe.teacher.label_col, recipe.capture.gold_field) == (
        "text",
        "category",
        "category",
    )
    assert 1000 <= recipe.curate.target_size <= 10000
    assert set(recipe.export.formats) == {"merged", "adapter", "gguf"} and recipe.export.parity_limit
    assert "# spec: openai:" in (ROOT / "recipes" / "mistral7b.yaml").read_text()


def test_a_published_csv_is_fetched_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from pipeline.errors import DistillError
    from pipeline.teachers.logs import import_logs

    site = tmp_path / "site"
    site.mkdir()
    banking77_shaped_csv(site / "train.csv")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_address[1]}/train.csv"
    try:
        first = import_logs(url, "text", "category")
        with pytest.raises(DistillError, match=r"could not download it .*pass the local file"):
            import_logs(url.replace("train.csv", "missing.csv"), "text", "category")
    finally:
        server.shutdown()
        server.server_close()  # a port still bound would hold the next connection until its timeout
    cached = list((tmp_path / "cache" / "downloads").glob("*-train.csv"))
    assert len(first.records) == LABELS * 12 and len(cached) == 1
    again = import_logs(url, "text", "category")  # the server is gone: read from the cache
    assert [r.answer for r in again.records] == [r.answer for r in first.records]


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flagship-twin")
    data = banking77_shaped_csv(folder / "train.csv")
    overrides = [
        "model.base=embedded:smollm2-135m-instruct",
        f"model.chat_template={ROOT / 'recipes/templates/chatml.jinja'}",
        f"teacher.spec=logs:{data}",
        f"capture.task={ROOT / 'data/banking77_task.yaml'}",
        "train.method=lora",
        "train.quant.load_in_4bit=false",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.grad_accum=1",
        "train.max_seq_len=256",
        "train.optim=adamw_torch",
        "train.gradient_checkpointing=false",
        "train.eos_check=warn",
        "train.logging_steps=1",
        "eval.max_new_tokens=12",
        "eval.limit=4",
        "export.gguf_types=[f16]",
        "export.verify_prompts=2",
        "export.verify_max_new_tokens=8",
        "export.parity_max_new_tokens=8",
        "export.parity_limit=4",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
    ]
    assert main(["run", "mistral7b", *overrides, "--runs-dir", str(folder / "runs")]) == 0
    return folder / "runs" / "mistral7b", load_recipe("mistral7b", root=ROOT, overrides=overrides)


def test_the_cpu_twin_imports_curates_trains_evaluates_with_cis_and_exports(twin_run):
    from pipeline.artifacts import read_manifest

    run, _ = twin_run
    assert read_manifest(run / "capture").counts["records"] == LABELS * 12
    assert read_manifest(run / "capture").counts["teacher_calls"] == 0
    assert read_manifest(run / "finetune").counts["steps"] == 3
    report = json.loads((run / "evaluate" / "report.json").read_text())
    for name in ("tuned_accuracy", "tuned_agreement"):
        figure = report["figures"][name]
        assert figure["lo"] <= figure["value"] <= figure["hi"] and figure["n"] == report["test_examples"] == 4
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert {a["artifact"] for a in parity["artifacts"]} == {"merged", "adapter", "gguf-f16"}
    assert parity["test_examples"] == 4
    assert (run / "export" / "merged" / "config.json").is_file()


def test_the_cpu_twin_is_served_and_answers_with_an_intent(twin_run):
    from fastapi.testclient import TestClient

    from pipeline.llm.policy import Policy
    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings
    from pipeline.router.wiring import student_for

    run, recipe = twin_run
    policy = Policy.load(run / "evaluate" / "router_policy.json")
    student = student_for(run / "export" / "merged", policy, recipe.serve)
    app = create_app(ServeSettings(), {recipe.serve.model_name: student}, policy)
    with TestClient(app) as client:
        reply = client.post(
            "/v1/chat/completions",
            json={
                "model": recipe.serve.model_name,
                "messages": [{"role": "user", "content": "my card has not arrived"}],
            },
        )
    assert reply.status_code == 200, reply.text
    answer = reply.json()["choices"][0]["message"]["content"]
    assert answer in load_task(ROOT / "data" / "banking77_task.yaml").labels  # label_posterior decode
