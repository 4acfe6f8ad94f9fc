"""Shared by tests/teachers/test_capture*.py and bench/bench_capture.py: prompt files and capture recipes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "data" / "task.yaml"


def write_prompts(path: Path, n: int, prefix: str = "question") -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i:04d}", "prompt": f"{prefix} number {i}"}) + "\n" for i in range(n)))
    return path


def write_recipe(
    folder: Path, teacher: dict, capture: dict | None = None, tracking_uri: str | None = None, name: str = "cap"
) -> Path:
    """A recipe whose capture section points into `folder` (own cache) and whose MLflow store is shared."""
    recipe = {
        "name": name,
        "teacher": {"few_shot": False, "max_new_tokens": 4, **teacher},
        "capture": {
            "prompts": str(folder / "prompts.jsonl"),
            "task": str(TASK),
            "cache": str(folder / "cache.sqlite"),
            **(capture or {}),
        },
        "tracking": {"uri": tracking_uri or f"sqlite:///{folder / 'mlflow.db'}", "experiment": "capture-tests"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def fast_retries(base_url: str, **extra) -> dict:
    """Teacher settings for a loopback fault server: short timeouts and backoff, a known price."""
    return {
        "spec": "openai:fault-model",
        "base_url": base_url,
        "timeout_s": 5,
        "max_retries": 8,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.2,
        "concurrency": 8,
        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        **extra,
    }


def read_records(runs: Path, name: str = "cap") -> list[dict]:
    return [json.loads(line) for line in (runs / name / "capture" / "teacher.jsonl").read_text().splitlines()]


LLAMA_ALIAS = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(log_path: Path, timeout_s: float = 180) -> Iterator[str]:
    """llama.cpp's real OpenAI-compatible server on 127.0.0.1 serving the embedded GGUF; yields its base URL."""
    from pipeline.llm.loading import embedded_gguf

    port = free_port()
    # One thread: on a shared 2-core machine llama.cpp's worker threads spin at barriers
    # while a neighbour holds the other core, and prompt evaluation swings 10x.
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(embedded_gguf(LLAMA_ALIAS)),
        "--model_alias",
        LLAMA_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
    ]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(base_url, proc, log_path, timeout_s)
        yield base_url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_ready(base_url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"llama.cpp server not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")
