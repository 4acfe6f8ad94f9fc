"""In-process teacher: a transformers model generating in batches (no cost, no network).

distill capture RECIPE teacher.spec=local:embedded:smollm2-135m-instruct
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import TYPE_CHECKING, Any

from pipeline.errors import DistillError
from pipeline.llm.completion import Completion

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pipeline.llm.encoding import PrefixCache
    from pipeline.teachers.ledger import Price


class LocalTeacher:
    in_process = True
    price: Price | None = None  # nothing to pay for
    forwards: frozenset[str] = frozenset()  # it decodes greedily with its own settings

    def __init__(
        self,
        model_ref: str,
        max_new_tokens: int,
        temperature: float = 0.0,
        labels: list[str] | None = None,
        score_labels: list[str] | None = None,
        schema: dict | None = None,
    ):
        if temperature != 0.0:
            raise DistillError("the local teacher decodes greedily; set teacher.temperature=0 (and teacher.n=1)")
        self.spec = f"local:{model_ref}"
        self.model_ref = model_ref
        self.max_new_tokens = max_new_tokens
        self.labels = labels  # decode only these strings (guided decoding for classification)
        self.score_labels = score_labels  # also record each label's log-likelihood (train.soft_labels)
        self.schema = schema  # decode only JSON valid against it (structured decoding for extraction)
        self.notes: list[str] = []
        self._model = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        # The instructions' KV cache, shared by every batch (llm/generate.py).
        self._prefix_cache: PrefixCache | None = None
        # One generate at a time: concurrent callers (a router) would otherwise each hold a
        # batch's activations at once. A thread lock, not an asyncio one, so it is not tied
        # to the event loop that first used it.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, model: str, cfg, labels: list[str] | None = None, schema: dict | None = None) -> LocalTeacher:
        constrain = labels if cfg.constrain_to_labels else None
        if cfg.label_distribution and not labels:
            raise DistillError(
                "teacher.label_distribution scores the task's labels; this task has none (a classification task only)"
            )
        score = labels if cfg.label_distribution else None
        return cls(
            model,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            labels=constrain,
            score_labels=score,
            schema=schema if cfg.constrain_to_schema else None,
        )

    def __repr__(self) -> str:
        return f"LocalTeacher({self.spec!r})"

    def identity(self) -> dict[str, Any]:
        from pipeline.llm.loading import model_content_hash

        identity = {"provider": "local", "model": self.model_ref, "max_new_tokens": self.max_new_tokens, "greedy": True}
        # A folder retrained in place keeps its path: its content decides which answers are its own.
        content = model_content_hash(self.model_ref)
        if content is not None:
            identity["content"] = content
        if self.labels:
            identity["constrained_to"] = self.labels
        if self.score_labels:
            identity["scores_labels"] = True
        if self.schema:
            from pipeline.artifacts import sha256_bytes

            # Unsorted: the schema's property order is the answers' key order.
            identity["constrained_to_schema"] = sha256_bytes(json.dumps(self.schema).encode())[:16]
        return identity

    async def complete(self, messages: list[dict], params: dict | None = None) -> Completion:
        if params:
            raise ValueError(f"{self.spec} decodes with its own settings; it takes no request parameters")
        return (await self.complete_batch([messages]))[0]

    async def complete_batch(self, conversations: list[list[dict]]) -> list[Completion]:
        # In a worker thread, so other callers on the event loop keep being served meanwhile.
        return await asyncio.to_thread(self._generate, conversations)

    async def aclose(self) -> None:
        """Nothing is bound to an event loop; the model stays loaded for the next call."""

    def _generate(self, conversations: list[list[dict]]) -> list[Completion]:
        from pipeline.llm.generate import generate_batch

        with self._lock:
            self._load()
            return generate_batch(
                self._model,
                self._tokenizer,
                conversations,
                self.max_new_tokens,
                self.labels,
                source=self.spec,
                score_labels=self.score_labels,
                prefix_cache=self._prefix_cache,
                schema=self.schema,
            )

    def _load(self) -> None:
        if self._model is None:
            from pipeline.llm.encoding import PrefixCache
            from pipeline.llm.loading import device_plan, load_model, load_tokenizer

            self._prefix_cache = PrefixCache()

            self._tokenizer = load_tokenizer(self.model_ref)
            self._model = load_model(self.model_ref, device_plan()).eval()
