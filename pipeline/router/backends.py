"""Backends that turn chat messages into a completion. The student is a local model folder.

A later issue adds a teacher backend (an OpenAI-compatible client) behind the same
`Backend` protocol, so the app never knows which kind it is calling.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Protocol

from pipeline.llm.completion import Completion

log = logging.getLogger(__name__)


class Backend(Protocol):
    async def complete(self, messages: list[dict[str, str]], max_tokens: int) -> Completion: ...


class StudentBackend:
    """The exported student, loaded once from `model_dir` with pipeline.llm."""

    def __init__(self, model_dir: Path):
        from pipeline.llm.loading import device_plan, load_model, load_tokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(str(self.model_dir))
        self.model = load_model(str(self.model_dir), device_plan())
        self.model.eval()
        # generate() mutates the tokenizer (padding side) and shares the model's caches:
        # one request at a time on this model.
        self._lock = threading.Lock()
        log.info("student loaded from %s", self.model_dir)

    async def complete(self, messages: list[dict[str, str]], max_tokens: int) -> Completion:
        # Generation is seconds of CPU/GPU work; run it off the event loop so /health and
        # other requests keep being answered meanwhile.
        return await asyncio.to_thread(self._complete, messages, max_tokens)

    def _complete(self, messages: list[dict[str, str]], max_tokens: int) -> Completion:
        from pipeline.llm.generate import generate_batch

        with self._lock:
            (completion,) = generate_batch(self.model, self.tokenizer, [messages], max_new_tokens=max_tokens,
                                           source="student")
        return completion
