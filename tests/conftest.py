"""Shared fixtures. No test touches the network: the hub is off and models are tiny or embedded.

Tests live in folders mirroring pipeline/'s packages, each basename unique (pytest's default
prepend import mode, no __init__.py). What several tests share lives in tests/support/, imported
as `support.<module>` (pytest puts this folder on sys.path), never in another test module."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

EMBEDDED = "embedded:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 converted to safetensors (cached across sessions in DISTILL_CACHE)."""
    from pipeline.llm.loading import resolve_model

    return Path(resolve_model(EMBEDDED))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer random Llama with the embedded tokenizer and chat template: fast and real."""
    from support.tiny_models import save_tiny_llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    out = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, seed=0)
    tokenizer.save_pretrained(out)
    return out
