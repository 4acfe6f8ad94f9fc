"""Capture through the `openai:` provider against llama.cpp's real OpenAI-compatible server.

    .venv/bin/pytest tests/test_capture_llama.py -q

The server (`python -m llama_cpp.server`, from llama-cpp-python) serves the embedded SmolLM2
GGUF on 127.0.0.1; nothing here is faked.
"""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from capture_helpers import ROOT, read_records, write_recipe

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")

from pipeline.artifacts import read_manifest  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.models import embedded_gguf  # noqa: E402

ALIAS = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    # One thread: on a shared 2-core machine llama.cpp's worker threads spin at barriers
    # while a neighbour holds the other core, and prompt evaluation swings 10x.
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf(ALIAS)), "--model_alias", ALIAS,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
           "--n_threads", "1", "--n_threads_batch", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(base_url, proc, log)
        yield base_url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_ready(base_url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"llama.cpp server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"llama.cpp server not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")


def test_capture_through_openai_provider_against_llama_cpp(llama_server, tmp_path):
    teacher = {"spec": f"openai:{ALIAS}", "base_url": llama_server, "max_new_tokens": 6, "concurrency": 2,
               "few_shot": True, "timeout_s": 120, "price": {"input_per_mtok": 0.1, "output_per_mtok": 0.4}}
    capture = {"prompts": str(ROOT / "data" / "prompts.jsonl"), "limit": 6}
    recipe = write_recipe(tmp_path, teacher, capture)
    runs = tmp_path / "runs"
    assert main(["capture", str(recipe), "--runs-dir", str(runs)]) == 0

    records = read_records(runs)
    assert len(records) == 6 and len({r["id"] for r in records}) == 6
    for record in records:
        meta = record["meta"]
        assert meta["error"] is None and record["messages"][-1]["content"].strip()
        assert meta["usage"]["prompt_tokens"] > 100 and 1 <= meta["usage"]["completion_tokens"] <= 6
        assert meta["cost_usd"] == pytest.approx(
            (meta["usage"]["prompt_tokens"] * 0.1 + meta["usage"]["completion_tokens"] * 0.4) / 1e6)
        assert isinstance(meta["logprobs"], float) and meta["logprobs"] <= 0
        assert meta["finish_reason"] in ("stop", "length") and meta["params"]["base_url"] == llama_server
    manifest = read_manifest(runs / "cap" / "capture")
    assert manifest.counts["teacher_calls"] == 6 and manifest.cost_usd == pytest.approx(
        sum(r["meta"]["cost_usd"] for r in records))
