"""Backends that turn chat messages into a completion. The student is a local model folder.

A later issue adds a teacher backend (an OpenAI-compatible client) behind the same
`Backend` protocol, so the app never knows which kind it is calling.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    mean_logprob: float  # the confidence signal the Policy reads


class Backend(Protocol):
    async def complete(self, messages: list[dict[str, str]], max_tokens: int) -> Completion: ...


class StudentBackend:
    """The exported student, loaded once from `model_dir` with pipeline.models."""

    def __init__(self, model_dir: Path):
        from pipeline.models import device_plan, load_model, load_tokenizer

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
        from pipeline.models import generate_batch

        with self._lock:
            prompt_tokens = self._count_prompt_tokens(messages)
            (gen,) = generate_batch(self.model, self.tokenizer, [messages], max_new_tokens=max_tokens)
        return Completion(
            text=gen.text,
            prompt_tokens=prompt_tokens,
            completion_tokens=gen.tokens,
            finish_reason="stop" if gen.stopped else "length",
            mean_logprob=gen.mean_logprob,
        )

    def _count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        # Same templating and encoding as generate_batch, so usage is what the model saw.
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
