"""What answers a request: the student (a local model folder) and the teacher (TeacherService).

The student backend answers the client's messages as they came (the student was trained on
exactly `Task.student_messages`). The teacher backend answers what capture sent the teacher
(`Task.teacher_messages`: instructions, worked examples, the prompt), through the same
TeacherService capture uses, so the router shares its cache, price table, ledger (budget
reserved before each call), retries and circuit breaker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.llm.completion import Completion
from pipeline.teachers.errors import TeacherFatalError

if TYPE_CHECKING:
    from pipeline.config import TeacherConfig
    from pipeline.task import Task
    from pipeline.teachers.service import TeacherService

log = logging.getLogger(__name__)


class Backend(Protocol):
    async def complete(self, messages: list[dict[str, str]], max_tokens: int) -> Completion: ...


class StudentBackend:
    """The exported student, loaded once from `model_dir` with pipeline.llm.

    Micro-batching: requests that arrive while a generate call runs (or within `window_s`
    of the first one) share the next call, up to `max_batch`, grouped by max_tokens; a lone
    request on an idle server waits for nobody (window 0, the default). Greedy decoding with
    left padding gives each request what a batch of one would (tests/test_router_escalation.py).

    `score_labels`: the policy's labels, passed to generate_batch so it fills
    `Completion.label_logprobs` when the policy's signal needs them."""

    def __init__(self, model_dir: Path, score_labels: list[str] | None = None, max_batch: int = 8,
                 window_s: float = 0.0):
        from pipeline.llm.loading import device_plan, load_model, load_tokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(str(self.model_dir))
        self.model = load_model(str(self.model_dir), device_plan())
        self.model.eval()
        self.max_batch = max_batch
        self.window_s = window_s
        self._extra = {"score_labels": list(score_labels)} if score_labels else {}
        # generate() mutates the tokenizer (padding side) and shares the model's caches:
        # one generate call at a time on this model.
        self._lock = threading.Lock()
        # Created on the serving loop by its first request; a new loop (a restarted app, a test's
        # next server) gets its own, since asyncio queues and tasks belong to one loop. The worker
        # runs only while requests are queued, so a backend no one holds any more (a registry
        # version the router swapped out) leaves no task behind and is freed with its model.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # size of each generate call, for tests and the bench
        self.ready = True
        log.info("student loaded from %s (micro-batches up to %d)", self.model_dir, max_batch)

    async def complete(self, messages: list[dict[str, str]], max_tokens: int) -> Completion:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._queue, self._worker = loop, asyncio.Queue(), None
        future = loop.create_future()
        self._queue.put_nowait((messages, max_tokens, future))
        # One event loop: the worker either has returned (done) or will see this request before it returns.
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._batch_while_queued())
        return await future

    async def _batch_while_queued(self) -> None:
        while not self._queue.empty():
            batch = await self._collect()
            for max_tokens in dict.fromkeys(mt for _, mt, _ in batch):
                group = [(m, f) for m, mt, f in batch if mt == max_tokens and not f.done()]  # done: caller gave up
                if group:
                    await self._run(group, max_tokens)

    async def _collect(self) -> list[tuple]:
        """The first waiting request, then whoever else is queued or arrives within the window."""
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        until = loop.time() + self.window_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = until - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    async def _run(self, group: list[tuple], max_tokens: int) -> None:
        # Generation is seconds of CPU/GPU work; off the event loop, so /health and other
        # requests keep being answered meanwhile.
        try:
            completions = await asyncio.to_thread(self._generate, [m for m, _ in group], max_tokens)
        except Exception as err:  # noqa: BLE001 - handed to every caller of this batch, not swallowed
            for _, future in group:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), completion in zip(group, completions, strict=True):
            if not future.done():
                future.set_result(completion)

    def _generate(self, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[Completion]:
        from pipeline.llm.generate import generate_batch

        with self._lock:
            self.batches.append(len(conversations))
            return generate_batch(self.model, self.tokenizer, conversations, max_new_tokens=max_tokens,
                                  source="student", **self._extra)


class TeacherBackend:
    """The recipe's teacher, asked with the task's teacher prompt; never raises for a failed call.

    The TeacherService is built by `start()`, on the server's event-loop thread: its SQLite
    cache connection belongs to the thread that opened it."""

    def __init__(self, cfg: TeacherConfig, task: Task, cache_path: Path | str, budget_usd: float | None = None):
        """`budget_usd` (serve.budget_usd) replaces teacher.budget_usd: what serving may spend."""
        self.cfg = cfg if budget_usd is None else cfg.model_copy(update={"budget_usd": budget_usd})
        self.task = task
        self.cache_path = cache_path
        self.service: TeacherService | None = None

    @property
    def spec(self) -> str:
        return self.cfg.spec

    @property
    def spent_usd(self) -> float:
        ledger = self.service.ledger if self.service is not None else None
        return ledger.spent_usd if ledger is not None else 0.0

    def estimated_cost(self, prompt: str, completion_tokens: int) -> float:
        """What the teacher would have charged to answer `prompt` at that length (0 when unpriced):
        the saving when the student answered instead."""
        from pipeline.teachers.ledger import prompt_tokens_estimate

        price = self.service.price if self.service is not None else None
        if price is None:
            return 0.0
        messages = self.task.teacher_messages(prompt, few_shot=self.cfg.few_shot)
        return price.cost(prompt_tokens_estimate(messages), max(completion_tokens, 1))

    def start(self) -> None:
        from pipeline.teachers.service import TeacherService

        if self.service is None:
            labels = self.task.labels if self.task.kind == "classification" else None
            self.service = TeacherService.from_config(self.cfg, cache_path=self.cache_path, labels=labels)

    async def answer(self, prompt: str, timeout_s: float) -> Completion:
        """The teacher's answer to `prompt`, or a Completion with `error` set: failed after its
        retries, over budget, past `timeout_s`, or refused (auth, circuit open)."""
        self.start()
        messages = self.task.teacher_messages(prompt, few_shot=self.cfg.few_shot)
        try:
            async with asyncio.timeout(max(timeout_s, 0.001)):
                (completion,) = await self.service.answer([messages])
        except TimeoutError:
            return self._failed(f"deadline: no teacher answer within {timeout_s:.2f} s")
        except TeacherFatalError as err:
            # A bad key or an open circuit: every request would fail the same way, so say it
            # loudly, and keep serving the student.
            log.error("teacher %s refused: %s", self.spec, err)
            return self._failed(f"{type(err).__name__}: {err}")
        return completion

    def _failed(self, error: str) -> Completion:
        return Completion(text="", source=self.spec, error=error, finish_reason="error")

    async def aclose(self) -> None:
        if self.service is not None:
            await self.service.aclose()
