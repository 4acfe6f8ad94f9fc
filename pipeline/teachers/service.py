"""The teacher service: a teacher behind the answer cache, the ledger and the dispatcher.

    distill capture RECIPE          (capture asks it for every prompt of the prompt set)

Capture, the LLM judge and the router's teacher backend all ask their teacher through this,
so each gets the same guarantees:

- an answer already in the SQLite cache is never bought again, and every answer bought is
  committed the moment it arrives (a crash loses nothing);
- a network teacher is driven by the dispatcher (concurrency, rate limits, retries) and the
  ledger (price, `teacher.budget_usd`); an in-process one generates in batches of
  `teacher.batch_size`, free;
- one answer in flight per distinct prompt: concurrent `answer` calls on one event loop that
  want the same prompt share the one call (a router asks once per request, concurrently);
- `params`: request parameters forwarded as a client sent them (the proxy: max_tokens,
  temperature, response_format, ...) instead of the teacher's own, part of the cache key.

A server (the router, the proxy) builds it with `ledger_path` (its spend kept across restarts)
and `charge_cached=False`: an answer found in the cache costs it nothing, while capture counts
what its cached answers cost against `teacher.budget_usd` (so a rerun with the same budget buys
nothing more).

    service = TeacherService.from_config(recipe.teacher, cache_path=recipe.capture.cache)
    answers = service.answer_sync(conversations)          # or: await service.answer(conversations)
    service.report                                        # cache hits, calls, ok/failed, spend, notes
    service.close()                                       # or: await service.aclose()

Failed calls come back as Completions with `error` set (and are not cached, so the next run
asks again); so do prompts the budget left unsent (`report.budget_stop`). Only a
TeacherFatalError is raised, after which no other prompt can succeed: TeacherAuthError
(401/403) or TeacherUnreachableError (the dispatcher's circuit breaker).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from pipeline.llm.completion import Completion
from pipeline.teachers.cache import TeacherCache, cache_key
from pipeline.teachers.dispatch import Dispatcher, Job, Limits
from pipeline.teachers.ledger import Ledger, Price
from pipeline.teachers.protocol import Teacher
from pipeline.teachers.registry import build_teacher

if TYPE_CHECKING:
    from pipeline.config import TeacherConfig

NOT_SENT = "not sent: teacher.budget_usd would have been exceeded"


@dataclass(frozen=True)
class ServiceReport:
    """Everything a service has done since it was built (all its `answer` calls together)."""

    asked: int  # conversations passed to answer(), duplicates included
    cache_hits: int  # of those, answered from the cache
    joined: int  # answered by a call another answer() had in flight for the same prompt
    calls: int  # distinct prompts sent to the teacher: ok + failed
    ok: int
    failed: int  # failed after every retry
    retries: int  # attempts beyond the first, across all calls
    not_sent: int  # left unsent because the budget would have been crossed
    budget_stop: bool
    metered: bool  # a network teacher: calls were priced and tokens counted (the fields below)
    spent_usd: float  # paid by this service; cached answers are free
    total_usd: float  # spent_usd plus what the cached answers it used cost when bought
    prompt_tokens: int
    completion_tokens: int
    notes: list[str] = field(default_factory=list)  # for a manifest: price source, refusals


@dataclass
class _Counts:
    asked: int = 0
    cache_hits: int = 0
    joined: int = 0
    ok: int = 0
    failed: int = 0
    attempts: int = 0
    not_sent: int = 0
    budget_stop: bool = False


@dataclass
class _LoopState:
    """What belongs to one event loop: asyncio primitives cannot cross loops, and answer_sync
    runs a fresh loop per call."""

    loop: asyncio.AbstractEventLoop
    dispatcher: Dispatcher | None
    pending: dict[str, asyncio.Future] = field(default_factory=dict)  # key -> the answer in flight


class TeacherService:
    def __init__(
        self,
        teacher: Teacher,
        cfg: TeacherConfig,
        cache: TeacherCache,
        progress: str | None = None,
        ledger_path: Path | None = None,
        charge_cached: bool = True,
    ):
        """`cfg` is the recipe's TeacherConfig (limits, retries, budget, batch size). `progress`
        names a progress bar over the calls (capture's); None shows none (a server).
        `ledger_path`: the ledger's store (ledger.py); `charge_cached`: module docstring."""
        self.teacher = teacher
        self.identity = teacher.identity()
        self.cache = cache
        self.progress = progress
        self._batch_size = cfg.batch_size
        self._limits = Limits.from_config(cfg)
        self._charge_cached = charge_cached
        self.ledger = None if teacher.in_process else Ledger(teacher.price, cfg.budget_usd, store=ledger_path)
        self._counts = _Counts()
        self._accounted: set[str] = set()  # keys whose cost is already in the ledger (bought or cached)
        self._state: _LoopState | None = None

    @classmethod
    def from_config(
        cls,
        cfg: TeacherConfig,
        cache_path: Path | str,
        labels: list[str] | None = None,
        progress: str | None = None,
        ledger_path: Path | None = None,
        charge_cached: bool = True,
        schema: dict | None = None,
    ) -> TeacherService:
        """The recipe's teacher (`cfg.spec`) behind the cache at `cache_path` (":memory:" keeps
        it in memory). `labels`: the task's labels on a classification task, else None; `schema`:
        an extraction task's output_schema, else None."""
        return cls(
            build_teacher(cfg.spec, cfg, labels, schema),
            cfg,
            TeacherCache(cache_path),
            progress,
            ledger_path=ledger_path,
            charge_cached=charge_cached,
        )

    @classmethod
    def for_task(
        cls,
        cfg: TeacherConfig,
        cache_path: Path | str,
        task,
        progress: str | None = None,
        ledger_path: Path | None = None,
        charge_cached: bool = True,
    ) -> TeacherService:
        """The teacher asked as capture asks it for this task: constrained to a classification
        task's labels or an extraction task's output_schema (as the recipe's teacher section allows)."""
        labels = task.labels if task.kind == "classification" else None
        schema = task.output_schema if task.kind == "extraction" else None
        return cls.from_config(
            cfg, cache_path, labels, progress, ledger_path=ledger_path, charge_cached=charge_cached, schema=schema
        )

    @property
    def price(self) -> Price | None:
        return self.teacher.price

    # ------------------------------------------------------------ asking

    def keys(
        self, conversations: list[list[dict]], samples: list[int] | None = None, params: dict | None = None
    ) -> list[str]:
        """The cache key of each conversation (sample: which of `teacher.n` answers it is)."""
        samples = samples if samples is not None else [0] * len(conversations)
        return [cache_key(self.identity, m, s, params) for m, s in zip(conversations, samples, strict=True)]

    async def answer(
        self, conversations: list[list[dict]], samples: list[int] | None = None, params: dict | None = None
    ) -> list[Completion]:
        """One Completion per conversation, in order: cached, else bought (each distinct prompt
        once, however many conversations or concurrent callers want it). `params`: forwarded
        request parameters (module docstring); a network teacher only."""
        if params and self.ledger is None:
            raise ValueError(
                f"{self.teacher.spec} answers with its own settings; request parameters need a network teacher"
            )
        samples = samples if samples is not None else [0] * len(conversations)
        keys = self.keys(conversations, samples, params)
        state = self._loop_state()
        wanted = list(dict.fromkeys(keys))
        joined = {k: state.pending[k] for k in wanted if k in state.pending}
        answers = self.cache.get_many([k for k in wanted if k not in joined])
        self._count_lookup(keys, answers, joined)
        messages, sample_of = dict(zip(keys, conversations)), dict(zip(keys, samples))
        todo = [Job(k, messages[k], params or None) for k in wanted if k not in answers and k not in joined]
        for job in todo:
            state.pending[job.key] = state.loop.create_future()
        try:
            await self._buy(todo, state)
        except BaseException as err:
            self._abandon(todo, state, err)
            raise
        for job in todo:
            future = state.pending.pop(job.key)
            if not future.done():
                future.set_result(self._not_sent())
            answers[job.key] = future.result()
        for key, future in joined.items():
            answers[key] = await self._await_joined(future, messages[key], sample_of[key], params)
        return [answers[k] for k in keys]

    def answer_sync(self, conversations: list[list[dict]], samples: list[int] | None = None) -> list[Completion]:
        """`answer` for a caller without an event loop (a stage): runs one, then closes the
        teacher's connections, which belong to that loop."""

        terminated: list[bool] = []

        async def go() -> list[Completion]:
            task = asyncio.current_task()
            assert task is not None  # go() runs as asyncio.run's main task
            undo = _cancel_on_sigterm(task, terminated)
            try:
                return await self.answer(conversations, samples)
            finally:
                undo()
                await self.teacher.aclose()

        try:
            answers = asyncio.run(go())
        except asyncio.CancelledError:
            if terminated:  # SIGTERM: the caller sees what Ctrl-C gives it
                raise KeyboardInterrupt from None
            raise
        if terminated:  # cancelled after the last answer came back: still a stop, not a finished stage
            raise KeyboardInterrupt
        return answers

    async def aclose(self) -> None:
        await self.teacher.aclose()
        self.close()

    def close(self) -> None:
        """For answer_sync callers: their connections are already closed; this closes the cache
        (and the ledger's store)."""
        self.cache.close()
        if self.ledger is not None:
            self.ledger.close()

    # ------------------------------------------------------------ report

    @property
    def report(self) -> ServiceReport:
        c, ledger = self._counts, self.ledger
        calls = c.ok + c.failed
        notes = []
        if ledger is not None and self.price is None:
            notes.append("unpriced teacher (teacher.allow_unpriced): cost recorded as $0")
        elif self.price is not None:
            p = self.price
            notes.append(f"price ${p.input_per_mtok}/${p.output_per_mtok} per 1M tokens in/out ({p.source})")
        return ServiceReport(
            asked=c.asked,
            cache_hits=c.cache_hits,
            joined=c.joined,
            calls=calls,
            ok=c.ok,
            failed=c.failed,
            # An in-process batch is one attempt for many answers: it has no retries to count.
            retries=max(c.attempts - calls, 0) if ledger else 0,
            not_sent=c.not_sent,
            budget_stop=c.budget_stop,
            metered=ledger is not None,
            spent_usd=ledger.spent_usd if ledger else 0.0,
            total_usd=ledger.total_usd if ledger else 0.0,
            prompt_tokens=ledger.prompt_tokens if ledger else 0,
            completion_tokens=ledger.completion_tokens if ledger else 0,
            notes=notes + list(self.teacher.notes),
        )

    # ------------------------------------------------------------ internals

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            dispatcher = None if self.ledger is None else Dispatcher(self.teacher, self._limits, self.ledger)
            self._state = _LoopState(loop, dispatcher)
        return self._state

    def _count_lookup(self, keys: list[str], cached: dict[str, Completion], joined: dict) -> None:
        self._counts.asked += len(keys)
        self._counts.cache_hits += sum(1 for k in keys if k in cached)
        self._counts.joined += sum(1 for k in keys if k in joined)
        for key, completion in cached.items():
            if key not in self._accounted:
                self._accounted.add(key)
                if self.ledger is not None and self._charge_cached:
                    self.ledger.count_cached(completion.cost_usd)

    async def _buy(self, todo: list[Job], state: _LoopState) -> None:
        """Answer every job, resolving its future (and committing it) as each arrives."""
        if not todo:
            return
        bar = tqdm(
            total=len(todo), desc=f"{self.progress} ({self.teacher.spec})", unit="answer", disable=self.progress is None
        )

        def on_answer(job: Job, completion: Completion) -> None:
            self._accounted.add(job.key)
            if completion.error is None:
                self.cache.put_many({job.key: completion})
                self._counts.ok += 1
            else:
                self._counts.failed += 1
            future = state.pending.get(job.key)
            if future is not None and not future.done():  # else its caller left (dispatch.py): cached only
                future.set_result(completion)
            bar.update(1)
            if self.ledger is not None:
                bar.set_postfix_str(f"${self.ledger.total_usd:.4f}", refresh=False)

        try:
            if state.dispatcher is None:
                await self._generate(todo, on_answer)
            else:
                report = await state.dispatcher.run(todo, on_answer)
                self._counts.attempts += report.attempts
                self._counts.not_sent += report.not_sent
                self._counts.budget_stop |= report.budget_stop
        finally:
            bar.close()

    async def _generate(self, todo: list[Job], on_answer) -> None:
        """In-process teacher: one batch at a time, each committed before the next is asked."""
        for start in range(0, len(todo), self._batch_size):
            batch = todo[start : start + self._batch_size]
            completions = await self.teacher.complete_batch([job.messages for job in batch])
            self._counts.attempts += 1
            for job, completion in zip(batch, completions, strict=True):
                on_answer(job, completion)

    def _abandon(self, todo: list[Job], state: _LoopState, err: BaseException) -> None:
        """The buying call died: whoever joined its prompts gets the same error (an auth error
        applies to them too) or, when it was merely cancelled, asks again itself."""
        for job in todo:
            future = state.pending.pop(job.key)
            if future.done():
                continue
            if isinstance(err, Exception):
                future.set_exception(err)
                future.exception()  # marks it retrieved: no "never retrieved" noise when nobody joined
            else:
                future.cancel()

    async def _await_joined(
        self, future: asyncio.Future, messages: list[dict], sample: int, params: dict | None
    ) -> Completion:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not future.cancelled() or (current is not None and current.cancelling()):
                raise  # this caller itself was cancelled
        # The caller that was buying it was cancelled, not us: buy it ourselves.
        [completion] = await self.answer([messages], [sample], params)
        return completion

    def _not_sent(self) -> Completion:
        return Completion(text="", source=self.teacher.spec, error=NOT_SENT, finish_reason="error")


def _cancel_on_sigterm(task: asyncio.Task, terminated: list) -> Callable[[], None]:
    """SIGTERM cancels the running capture from the event loop, as asyncio.run's own Ctrl-C
    handler does, so it unwinds through every task's cleanup (answers committed) whatever the
    process's SIGINT disposition; a KeyboardInterrupt raised inside a task instead could be
    logged as "never retrieved". Returns the undo, which puts the previous handler back (the
    loop's removal alone would leave SIGTERM at its default: killing the next stage outright)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop, previous = asyncio.get_running_loop(), signal.getsignal(signal.SIGTERM)

    def stop() -> None:
        terminated.append(True)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)

    return undo
