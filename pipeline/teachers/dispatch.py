"""Drive a network teacher's calls: concurrency, rate limits, retries, the budget.

Used by the teacher service (service.py) for openai:/anthropic: teachers, so by capture
(`distill capture RECIPE`), the judge and the router's teacher backend alike.

- Concurrency: at most `teacher.concurrency` calls in flight (a semaphore).
- Rate limits: `teacher.rpm` requests and `teacher.tpm` tokens per minute (aiolimiter's
  leaky buckets; tokens are the prompt estimate plus max_new_tokens, as providers count them).
- Retries: tenacity, on retryable TeacherCallErrors only (429, 5xx, timeouts, unreadable
  bodies), full-jitter exponential backoff, the server's Retry-After honoured when it gives one.
- Budget: a call is sent only once the Ledger could reserve its worst-case cost; when it
  cannot, in-flight calls are awaited (they may cost less than reserved) before giving up.
  An attempt whose outcome is unknown (timeout, cut-off body, reset after sending) is
  charged its reservation, and its retry must reserve again.
- Fail fast: the first call goes alone (a preflight: a bad key, model or URL costs one
  request, not `concurrency` of them), and CONNECT_FAILURES attempts in a row that cannot
  connect open a circuit breaker (TeacherUnreachableError, naming the URL).
- Fatal errors (TeacherAuthError, TeacherUnreachableError) are never retried and cancel
  everything at once.
- Cancellation: a caller cancelled while its job waits (for a slot, the budget, the rate
  limits) gives back the slot and the reservation it took. A caller cancelled while its call is
  on the wire (a router's client hung up, a deadline passed) leaves that attempt to finish in
  the background: it is charged what it really cost and handed to `on_answer` (so cached)
  instead of being charged its worst case unread; nothing is retried for it.

Each answer is handed to `on_answer` the moment it arrives, so the caller can commit it to
the cache before anything else can go wrong. Several `run`s may be in flight at once on one
event loop (a router asking for one answer per request): they share the concurrency slots,
the rate limits and the ledger. asyncio primitives belong to the loop that first waits on
them, so a dispatcher serves one event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.wait import wait_base

from pipeline.llm.completion import Completion
from pipeline.teachers.errors import TeacherCallError, TeacherFatalError, TeacherUnreachableError
from pipeline.teachers.ledger import Ledger, prompt_tokens_estimate

log = logging.getLogger(__name__)

WINDOWS = 10  # rate limits are enforced over 6-second windows (a tenth of the per-minute limit)
CONNECT_FAILURES = 3  # attempts in a row that could not connect before the circuit breaker opens


@dataclass
class Job:
    key: str
    messages: list[dict]
    params: dict | None = None  # request parameters sent as given (the proxy's), else the teacher's own

    def max_new_tokens(self, default: int) -> int:
        params = self.params or {}
        return params.get("max_completion_tokens") or params.get("max_tokens") or default


@dataclass
class Limits:
    concurrency: int
    max_new_tokens: int
    rpm: int | None = None
    tpm: int | None = None
    max_retries: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0

    @classmethod
    def from_config(cls, cfg) -> Limits:
        return cls(
            concurrency=cfg.concurrency,
            max_new_tokens=cfg.max_new_tokens,
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            max_retries=cfg.max_retries,
            backoff_initial_s=cfg.backoff_initial_s,
            backoff_max_s=cfg.backoff_max_s,
        )


@dataclass
class DispatchReport:
    ok: int = 0
    failed: int = 0
    attempts: int = 0
    not_sent: int = 0  # left unsent because the budget ran out
    budget_stop: bool = False

    @property
    def sent(self) -> int:
        return self.ok + self.failed


class wait_retry_after(wait_base):
    """The server's Retry-After when the error carries one (capped), else the fallback wait."""

    def __init__(self, fallback: wait_base, cap: float):
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            return min(after, self.cap)
        return self.fallback(retry_state)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, TeacherCallError) and exc.retryable


class Dispatcher:
    def __init__(self, teacher, limits: Limits, ledger: Ledger):
        self.teacher = teacher
        self.limits = limits
        self.ledger = ledger
        self._slots = asyncio.Semaphore(limits.concurrency)
        self._in_flight = 0
        self._settled = asyncio.Event()
        self._connect_failures = 0  # consecutive attempts that could not connect (the circuit breaker)
        self._finishing: set[asyncio.Task] = set()  # calls on the wire whose caller left (held till done)
        # Buckets hold a tenth of the minute's allowance: a full minute's burst at start is
        # what per-second enforcement on the provider's side rejects.
        self._rpm = AsyncLimiter(limits.rpm / WINDOWS, 60 / WINDOWS) if limits.rpm else None
        self._tpm = AsyncLimiter(limits.tpm / WINDOWS, 60 / WINDOWS) if limits.tpm else None

    async def run(self, jobs: list[Job], on_answer: Callable[[Job, Completion], None]) -> DispatchReport:
        """Send every job (or as many as the budget allows); return this run's counts."""
        report = DispatchReport()
        try:
            async with asyncio.TaskGroup() as group:
                for i, job in enumerate(jobs):
                    call = await self._admit(job)
                    if call is None:
                        report.budget_stop, report.not_sent = True, len(jobs) - i
                        break
                    task = group.create_task(self._one(job, call, report, on_answer))
                    # A call cancelled before it began never runs its own cleanup: this does it.
                    task.add_done_callback(partial(self._release_unstarted, call))
                    if i == 0:
                        # The first call goes alone: a bad key, model or URL then costs one
                        # request, not `concurrency` of them.
                        await asyncio.wait([task])
        except ExceptionGroup as group_error:
            # Callers handle plain exceptions; the group is an asyncio detail. A fatal error
            # (auth, unreachable) is the cause of the others (cancelled because of it), so it wins.
            fatal = [e for e in group_error.exceptions if isinstance(e, TeacherFatalError)]
            if fatal:
                raise fatal[0] from None
            if len(group_error.exceptions) == 1:
                raise group_error.exceptions[0] from None
            raise
        return report

    async def _admit(self, job: Job) -> _Call | None:
        """A concurrency slot, the job's worst-case reservation and its turn under the rate limits;
        None when the budget cannot cover it. Cancelled part-way, it gives back what it took."""
        await self._slots.acquire()
        reserved = self.ledger.max_call_cost(job.messages, job.max_new_tokens(self.limits.max_new_tokens))
        held = False
        try:
            if not await self._reserve(reserved):
                self._slots.release()
                return None
            held = True
            await self._throttle(job)
        except BaseException:
            if held:
                self.ledger.settle(reserved, None)
            self._slots.release()
            self._settled.set()
            raise
        self._in_flight += 1
        return _Call(reserved, held=reserved)

    def _release_unstarted(self, call: _Call, _: asyncio.Task) -> None:
        if not call.started:
            self.ledger.settle(call.held, None)
            self._release_slot()

    def _release_slot(self) -> None:
        self._slots.release()
        self._in_flight -= 1
        self._settled.set()

    async def _reserve(self, amount: float) -> bool:
        while not self.ledger.reserve(amount):
            if self._in_flight == 0:
                return False
            # No await between clear() and wait(): a settle cannot slip in and be missed.
            self._settled.clear()
            await self._settled.wait()
        return True

    async def _throttle(self, job: Job) -> None:
        if self._rpm:
            await self._rpm.acquire(1)
        if self._tpm:
            tokens = prompt_tokens_estimate(job.messages) + job.max_new_tokens(self.limits.max_new_tokens)
            # aiolimiter refuses an amount above its bucket; such a call waits for a full bucket.
            await self._tpm.acquire(min(tokens, self._tpm.max_rate))

    async def _one(
        self, job: Job, call: _Call, report: DispatchReport, on_answer: Callable[[Job, Completion], None]
    ) -> None:
        work = asyncio.ensure_future(self._complete(job, call, report, on_answer))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.done():
                if not work.cancelled():
                    work.exception()  # retrieved: its outcome was already handled by _complete
                raise
            if not call.sending:
                work.cancel()  # between attempts: nothing is on the wire, so nothing is owed
                raise
            # The caller left while the request is out: let it finish (charged what it cost,
            # its answer handed on and cached) rather than charge its worst case unread.
            call.abandoned = True
            self._finishing.add(work)
            work.add_done_callback(self._finished)
            raise

    async def _complete(
        self, job: Job, call: _Call, report: DispatchReport, on_answer: Callable[[Job, Completion], None]
    ) -> None:
        call.started = True  # from here its own cleanup releases the slot and the reservation
        try:
            completion, usage = await self._call(job, report, call)
        except asyncio.CancelledError:
            if call.sending:
                # Cut off mid-call (an auth error elsewhere, the event loop closing): the server
                # may still bill it, so the reservation is charged rather than released.
                self.ledger.charge_reserved(call.held)
            else:
                self.ledger.settle(call.held, None)
            raise
        except BaseException:
            self.ledger.settle(call.held, None)  # a fatal error: this attempt was refused, not billed
            raise
        finally:
            self._release_slot()
        completion.cost_usd = call.charged + self.ledger.settle(call.held, usage)
        if completion.error is None:
            report.ok += 1
        else:
            report.failed += 1
        on_answer(job, completion)

    def _finished(self, work: asyncio.Task) -> None:
        self._finishing.discard(work)
        if not work.cancelled() and work.exception() is not None:
            log.warning("a teacher call finished after its caller left, and failed: %s", work.exception())

    async def _call(self, job: Job, report: DispatchReport, call: _Call) -> tuple[Completion, dict | None]:
        """The answer and its usage, or a failed Completion and None once retries are spent."""
        try:
            completion = await self._call_with_retries(job, report, call)
        except TeacherCallError as err:
            return Completion(text="", source=self.teacher.spec, error=str(err), finish_reason="error"), None
        return completion, completion.usage

    async def _call_with_retries(self, job: Job, report: DispatchReport, call: _Call) -> Completion:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.limits.max_retries + 1),
            wait=wait_retry_after(
                wait_random_exponential(multiplier=self.limits.backoff_initial_s, max=self.limits.backoff_max_s),
                cap=self.limits.backoff_max_s,
            ),
            retry=retry_if_exception(_retryable),
            before_sleep=_log_retry,
            reraise=True,
        )
        return await retrying(self._attempt, job, report, call)

    async def _attempt(self, job: Job, report: DispatchReport, call: _Call) -> Completion:
        if call.abandoned:
            raise TeacherCallError(ABANDONED_RETRY)
        if call.held == 0 and call.reserved and not self.ledger.reserve(call.reserved):
            # The last attempt was charged as possibly billed and another one no longer fits.
            report.budget_stop = True
            raise TeacherCallError(BUDGET_RETRY)
        call.held = call.reserved
        report.attempts += 1
        call.sending = True  # left set if this await is cancelled: the request may be out
        try:
            if job.params:
                completion = await self.teacher.complete(job.messages, job.params)
            else:
                completion = await self.teacher.complete(job.messages)
        except TeacherCallError as err:
            call.sending = False
            self._count_connection(err)
            if err.billable:
                call.charged += self.ledger.charge_reserved(call.held)
                call.held = 0.0
                self._settled.set()
            raise
        call.sending = False
        self._connect_failures = 0
        return completion

    def _count_connection(self, err: TeacherCallError) -> None:
        """The circuit breaker: CONNECT_FAILURES attempts in a row that could not even connect
        mean a dead URL, not a busy server. Without it every prompt would sit through its own
        full round of retries (tens of minutes for a prompt set)."""
        if not err.unreachable:
            self._connect_failures = 0
            return
        self._connect_failures += 1
        if self._connect_failures >= CONNECT_FAILURES:
            raise TeacherUnreachableError(
                f"teacher {self.teacher.spec} is unreachable: {err} on {self._connect_failures} attempts in a row; "
                "check teacher.base_url and that the server is running"
            ) from None


@dataclass
class _Call:
    """One job's attempts: the worst case of one attempt, the reservation held for the next
    send (0 once an unknown-outcome attempt was charged it), and what such attempts cost;
    whether its task began, whether a request is on the wire, whether its caller left."""

    reserved: float
    held: float = 0.0
    charged: float = 0.0
    started: bool = False
    sending: bool = False
    abandoned: bool = False


BUDGET_RETRY = "not retried: teacher.budget_usd would have been exceeded (earlier attempts may have been billed)"
ABANDONED_RETRY = "not retried: the caller left"


def _log_retry(retry_state) -> None:
    exc = retry_state.outcome.exception()
    log.debug("teacher call attempt %d failed (%s); retrying", retry_state.attempt_number, exc)
