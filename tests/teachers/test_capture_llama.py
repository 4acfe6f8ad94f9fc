"""Capture through the `openai:` provider against llama.cpp's real OpenAI-compatible server.

    .venv/bin/pytest tests/teachers/test_capture_llama.py -q

The server (`python -m llama_cpp.server`, from llama-cpp-python) serves the embedded SmolLM2
GGUF on 127.0.0.1; nothing here is faked.
"""

import pytest
import yaml
from support.capture_helpers import LLAMA_ALIAS, ROOT, read_records, write_recipe
from support.capture_helpers import llama_server as start_llama_server

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")

from pipeline.artifacts import read_manifest  # noqa: E402
from pipeline.cli import main  # noqa: E402

ALIAS = LLAMA_ALIAS


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    with start_llama_server(tmp_path_factory.mktemp("llama") / "server.log") as base_url:
        yield base_url


def test_capture_through_openai_provider_against_llama_cpp(llama_server, tmp_path):
    # 16 tokens: the answer comes as {"label": "..."} (response_format with the task's label enum).
    teacher = {
        "spec": f"openai:{ALIAS}",
        "base_url": llama_server,
        "max_new_tokens": 16,
        "concurrency": 2,
        "few_shot": True,
        "timeout_s": 120,
        "price": {"input_per_mtok": 0.1, "output_per_mtok": 0.4},
    }
    capture = {"prompts": str(ROOT / "data" / "prompts.jsonl"), "limit": 6}
    recipe = write_recipe(tmp_path, teacher, capture)
    runs = tmp_path / "runs"
    assert main(["capture", str(recipe), "--runs-dir", str(runs)]) == 0

    records = read_records(runs)
    assert len(records) == 6 and len({r["id"] for r in records}) == 6
    labels = yaml.safe_load((ROOT / "data" / "task.yaml").read_text())["labels"]
    answers = [r["messages"][-1]["content"] for r in records]
    assert all(answer in labels for answer in answers), f"llama.cpp answered outside the label set: {answers}"
    for record in records:
        meta = record["meta"]
        assert meta["error"] is None and record["messages"][-1]["content"].strip()
        assert meta["usage"]["prompt_tokens"] > 100 and 1 <= meta["usage"]["completion_tokens"] <= 16
        assert meta["cost_usd"] == pytest.approx(
            (meta["usage"]["prompt_tokens"] * 0.1 + meta["usage"]["completion_tokens"] * 0.4) / 1e6
        )
        assert isinstance(meta["logprobs"], float) and meta["logprobs"] <= 0
        assert meta["finish_reason"] in ("stop", "length") and meta["params"]["base_url"] == llama_server
    manifest = read_manifest(runs / "cap" / "capture")
    assert manifest.counts["teacher_calls"] == 6 and manifest.cost_usd == pytest.approx(
        sum(r["meta"]["cost_usd"] for r in records)
    )
