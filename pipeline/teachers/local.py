"""In-process teacher: a transformers model generating in batches (no cost, no network).

    distill capture RECIPE teacher.spec=local:embedded:smollm2-135m-instruct
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.errors import DistillError
from pipeline.teachers import Completion


class LocalTeacher:
    def __init__(self, model_ref: str, max_new_tokens: int, temperature: float = 0.0, labels: list[str] | None = None):
        if temperature != 0.0:
            raise DistillError("the local teacher decodes greedily; set teacher.temperature=0 (and teacher.n=1)")
        self.spec = f"local:{model_ref}"
        self.model_ref = model_ref
        self.max_new_tokens = max_new_tokens
        self.labels = labels  # decode only these strings (guided decoding for classification)
        self._model = None
        self._tokenizer = None

    def identity(self) -> dict[str, Any]:
        identity = {"provider": "local", "model": self.model_ref, "max_new_tokens": self.max_new_tokens, "greedy": True}
        if self.labels:
            identity["constrained_to"] = self.labels
        return identity

    def _load(self) -> None:
        if self._model is None:
            from pipeline.models import device_plan, load_model, load_tokenizer

            self._tokenizer = load_tokenizer(self.model_ref)
            self._model = load_model(self.model_ref, device_plan()).eval()

    async def complete_batch(self, conversations: list[list[dict]]) -> list[Completion]:
        from pipeline.models import generate_batch

        self._load()
        start = time.perf_counter()
        generations = generate_batch(self._model, self._tokenizer, conversations, self.max_new_tokens, self.labels)
        per_item_ms = int((time.perf_counter() - start) * 1000 / max(len(conversations), 1))
        completions = []
        for conv, gen in zip(conversations, generations):
            prompt_tokens = len(self._tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True))
            completions.append(Completion(
                text=gen.text,
                usage={"prompt_tokens": prompt_tokens, "completion_tokens": gen.tokens},
                latency_ms=per_item_ms,
                logprobs=gen.mean_logprob,
                finish_reason="stop" if gen.stopped else "length",
            ))
        return completions
