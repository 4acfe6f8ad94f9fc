"""Batch capture: the uncached prompts as provider batches, at the batch price (about half).

    distill capture RECIPE teacher.spec=openai:gpt-4o-mini teacher.mode=batch
    distill capture RECIPE teacher.mode=batch --no-wait      (submit, exit; the next capture collects)
    distill batches RECIPE [--cancel BATCH_ID]

Capture (pipeline/stages/capture.py) calls `run_batches` before asking the teacher service,
which then finds the batch answers in the cache like any other and buys only what is left
(the requests that failed in a batch, when few enough) synchronously.

Never the same prompts twice, whatever dies when: a submission is committed to the SQLite
teacher cache (its prompt keys, its worst-case cost) before its input is uploaded; the file id
before the batch is created; the batch id the moment the provider returns it. A rerun waits on
recorded batches instead of submitting their prompts again. The one window left, a create the
provider accepted whose answer never arrived, is closed by looking for the batch on the
provider (OpenAI: by our submission id in its metadata) before any retry and on the next run.
Results are imported in one transaction with the batch marked imported (cache.py).

Budget: every batch reserves the worst case of all its requests at the batch price (every
prompt byte a token, every allowed output token used) before it is submitted; cached answers
and batches still running count against `teacher.budget_usd` too. What does not fit waits for
the running batches' real cost to be known, then goes in a later batch, or is left unsent.

Expired or cancelled batches keep what finished; an expired batch's rest is submitted again
(up to ROUNDS batches a run); a cancelled one's on the next run, since someone chose to stop it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from pipeline.artifacts import sha256_json
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion
from pipeline.teachers.batch_providers import Result, Status, batches_for
from pipeline.teachers.cache import BatchRow, TeacherCache
from pipeline.teachers.errors import TeacherCallError
from pipeline.teachers.ledger import Ledger, Price, resolve_batch_price

log = logging.getLogger(__name__)

ROUNDS = 4  # batches per run for prompts whose batch expired: each round keeps what finished
POLL_GROWTH = 20  # polls back off from teacher.batch_poll_s to this many times it
UNFINISHED = ("preparing", "submitting", "submitted")


class BatchesPending(DistillError):
    """`--no-wait`: batches are submitted and recorded; the next capture collects them."""


@dataclass
class BatchReport:
    """What batch mode did in one capture run."""

    batches: list[str] = field(default_factory=list)  # provider ids imported or submitted this run
    submitted: int = 0  # requests submitted this run
    imported: int = 0  # answers imported this run
    failed: dict[str, str] = field(default_factory=dict)  # key -> error, for keys still without an answer
    lost: int = 0  # requests a batch ended before running (expired, cancelled)
    cancelled: list[str] = field(default_factory=list)
    cost_usd: float = 0.0  # of the imported answers, at the batch price
    sync_cost_usd: float = 0.0  # the same answers at the sync price
    not_sent: int = 0  # left out of every batch: the budget's worst case would have been crossed
    budget_stop: bool = False
    price: Price | None = None

    @property
    def saved_usd(self) -> float:
        return self.sync_cost_usd - self.cost_usd


def teacher_key(identity: dict) -> str:
    """Batches belong to one teacher identity, as cached answers do."""
    return sha256_json(identity)[:16]


def run_batches(service, cfg, conversations: list[list[dict]], samples: list[int]) -> BatchReport:
    """Make sure every prompt is answered in the cache or was tried in a batch: recover what a
    crash left, submit what no batch covers, wait for them (unless `cfg.batch_wait` is off), import."""
    keys = service.keys(conversations, samples)
    run = _Run(service, cfg, dict(zip(keys, conversations)))
    try:
        return asyncio.run(run.go())
    except TeacherCallError as err:
        raise DistillError(
            f"teacher {service.teacher.spec} batch API: {err}. Every batch submitted so far is recorded "
            f"in the teacher cache: rerun to continue (`distill batches RECIPE` lists them)"
        ) from None


class _Run:
    def __init__(self, service, cfg, messages: dict[str, list[dict]]):
        self.cfg = cfg
        self.cache: TeacherCache = service.cache
        self.spec = service.teacher.spec
        self.teacher = teacher_key(service.identity)
        self.api = batches_for(service.teacher, cfg)
        self.sync_price = service.price
        provider, _, model = self.spec.partition(":")
        self.report = BatchReport(price=resolve_batch_price(provider, model, service.price))
        self.messages = messages  # key -> conversation: the prompt set, each prompt and sample once
        self._tried: set[str] = set()  # keys a batch of this run answered with an error

    async def go(self) -> BatchReport:
        try:
            await self._recover()
            for _ in range(ROUNDS):
                await self._submit(self._unsubmitted())
                active = self._active()
                if not active or not self.cfg.batch_wait:
                    break
                await self._wait(active)
                if self.report.cancelled:
                    break
            if not self.cfg.batch_wait and self._active():
                raise BatchesPending(self._pending_summary())
            self._collect_failures()
            return self.report
        finally:
            await self.api.aclose()

    # ------------------------------------------------------------ what is left

    def _unsubmitted(self) -> list[str]:
        """Prompts with no answer, in no unfinished batch, and not failed in a batch of this run
        (those go to the sync retry, or a follow-up batch on the next run)."""
        answered = self.cache.costs(list(self.messages))
        covered = {k for row in self._unfinished() for k in self.cache.submission_keys(row.submission, "pending")}
        return [k for k in self.messages if k not in answered and k not in covered and k not in self._tried]

    def _unfinished(self) -> list[BatchRow]:
        return self.cache.submissions(self.teacher, UNFINISHED)

    def _active(self) -> list[BatchRow]:
        """Submitted batches holding some prompt of this prompt set."""
        mine = set(self.messages)
        return [
            row
            for row in self.cache.submissions(self.teacher, ("submitted",))
            if mine.intersection(self.cache.submission_keys(row.submission))
        ]

    def _collect_failures(self) -> None:
        answered = self.cache.costs(list(self.messages))
        for row in self.cache.submissions(self.teacher, ("imported",)):
            for key, error in self.cache.failed_requests(row.submission).items():
                if key in self.messages and key not in answered:
                    self.report.failed[key] = error

    # ------------------------------------------------------------ recovery

    async def _recover(self) -> None:
        """Settle what a killed run left half-done. A `preparing` submission never sent its create
        request (that state is committed first), so no batch exists; a `submitting` one may have."""
        for row in self.cache.submissions(self.teacher, ("preparing",)):
            self.cache.drop_submission(row.submission)
        for row in self.cache.submissions(self.teacher, ("submitting",)):
            found = await self._retry(self.api.find, row.submission, row.created, row.requests)
            if found is None:
                log.info(
                    "batch submission %s never reached the provider: its prompts will be submitted", row.submission
                )
                self.cache.drop_submission(row.submission)
            else:
                log.info("batch %s: found on the provider after an interrupted submission", found)
                self.cache.update_submission(row.submission, batch_id=found, state="submitted")

    # ------------------------------------------------------------ submission

    async def _submit(self, keys: list[str]) -> None:
        chosen = self._within_budget(keys)
        for chunk in self._split(chosen):
            await self._submit_one(chunk)

    def _within_budget(self, keys: list[str]) -> list[tuple[str, float]]:
        """The longest prefix of `keys` whose worst case fits beside what the prompt set's cached
        answers cost and what running batches hold."""
        ledger = self._ledger()
        chosen = []
        for key in keys:
            worst = ledger.max_call_cost(self.messages[key], self.cfg.max_new_tokens)
            if not ledger.reserve(worst):
                break
            chosen.append((key, worst))
        self.report.not_sent = len(keys) - len(chosen)
        self.report.budget_stop = self.report.not_sent > 0
        if self.report.budget_stop:
            log.warning(
                "batch: %d of %d prompts left out: their worst case at the batch price would cross "
                "teacher.budget_usd=$%.4f",
                self.report.not_sent,
                len(keys),
                self.cfg.budget_usd,
            )
        return chosen

    def _ledger(self) -> Ledger:
        prior = sum(self.cache.costs(list(self.messages)).values())
        ledger = Ledger(self.report.price, self.cfg.budget_usd, prior_usd=prior)
        ledger.reserved_usd = sum(row.reserved_usd for row in self._unfinished())  # already submitted
        return ledger

    def _split(self, chosen: list[tuple[str, float]]) -> list[list[tuple[str, float, dict, int]]]:
        """Chunks under the provider's request and byte limits (and teacher.batch_max_requests)."""
        limits = self.api.limits
        most = min(self.cfg.batch_max_requests or limits.max_requests, limits.max_requests)
        chunks: list[list] = []
        size = 0
        for key, worst in chosen:
            request = self.api.request(key, self.messages[key])
            n = len(self.api.encode([request]))
            if not chunks or len(chunks[-1]) >= most or size + n > limits.max_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append((key, worst, request, n))
            size += n
        return chunks

    async def _submit_one(self, chunk: list[tuple[str, float, dict, int]]) -> None:
        keys, requests = [c[0] for c in chunk], [c[2] for c in chunk]
        row = BatchRow(
            submission=uuid.uuid4().hex,
            teacher=self.teacher,
            spec=self.spec,
            state="preparing",
            requests=len(chunk),
            reserved_usd=sum(c[1] for c in chunk),
            created=time.time(),
        )
        self.cache.add_submission(row, keys)  # before anything is sent
        create_sent = False
        try:
            file_id = None
            if self.api.uploads_input:
                file_id = await self._retry(
                    self.api.upload, self.api.encode(requests), f"distill-{row.submission}.jsonl"
                )
            self.cache.update_submission(row.submission, input_file_id=file_id, state="submitting")
            create_sent = True
            batch_id = await self._create(row, file_id, requests)
        except BaseException:
            if not create_sent:
                self.cache.drop_submission(row.submission)  # no create was sent: no batch exists
            raise
        self.cache.update_submission(row.submission, batch_id=batch_id, state="submitted")
        self.report.batches.append(batch_id)
        self.report.submitted += len(chunk)
        log.info(
            "batch %s submitted: %d requests, $%.4f reserved (worst case at the batch price)",
            batch_id,
            len(chunk),
            row.reserved_usd,
        )

    async def _create(self, row: BatchRow, file_id: str | None, requests: list[dict]) -> str:
        """Create the batch. A failed create may still have reached the provider, so before each
        retry (and before giving up) the provider is asked whether it has it."""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return await self.api.create(file_id, requests, row.submission)
            except TeacherCallError as err:
                found = await self._retry(self.api.find, row.submission, row.created, row.requests)
                if found is not None:
                    return found
                if not err.retryable:
                    self.cache.drop_submission(row.submission)  # refused (4xx): no batch exists
                    raise
                if attempt == self.cfg.max_retries:
                    raise  # left `submitting`: the next run looks for it again before resubmitting
                await asyncio.sleep(min(self.cfg.backoff_initial_s * 2**attempt, self.cfg.backoff_max_s))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ waiting and importing

    async def _wait(self, active: list[BatchRow]) -> None:
        pending = {row.submission: row for row in active}
        delay, start = self.cfg.batch_poll_s, time.monotonic()
        while pending:
            statuses = {}
            for sub, row in list(pending.items()):
                status = await self._retry(self.api.status, row.batch_id)
                statuses[sub] = status
                self.cache.update_submission(
                    sub, provider_status=status.provider_status, done=status.done, failed=status.failed
                )
                if status.ended:
                    await self._import(row, status)
                    del pending[sub]
            if pending:
                _progress(statuses, time.monotonic() - start)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.batch_poll_s * POLL_GROWTH)

    async def _import(self, row: BatchRow, status: Status) -> None:
        assert row.batch_id is not None  # only a submitted batch is imported, and it has its provider id
        results: list[Result] = await self._retry(self.api.results, row.batch_id, status)
        wanted = set(self.cache.submission_keys(row.submission))
        answers: dict[str, Completion] = {}
        failed: dict[str, str] = {}
        sync_cost = 0.0
        for result in results:
            if result.key not in wanted:
                continue  # not a request of ours: never let a stray line into the cache
            if result.completion is not None:
                result.completion.cost_usd = self._cost(result.key, result.completion, self.report.price)
                sync_cost += self._cost(result.key, result.completion, self.sync_price)
                answers[result.key] = result.completion
            elif result.error is not None:
                failed[result.key] = result.error
        lost = len(wanted) - len(answers) - len(failed)
        cost = sum(c.cost_usd for c in answers.values())
        self.cache.import_results(
            row.submission,
            answers,
            failed,
            f"batch:{row.batch_id}",
            provider_status=status.provider_status,
            done=len(answers),
            failed=len(failed),
            cost_usd=cost,
            sync_cost_usd=sync_cost,
            output_file_id=status.output_file_id,
            error_file_id=status.error_file_id,
        )
        self._tried |= set(failed)
        r = self.report
        r.imported, r.lost, r.cost_usd, r.sync_cost_usd = (
            r.imported + len(answers),
            r.lost + lost,
            r.cost_usd + cost,
            r.sync_cost_usd + sync_cost,
        )
        if row.batch_id not in r.batches:
            r.batches.append(row.batch_id)
        if status.cancelled:
            r.cancelled.append(row.batch_id)
        log.info(
            "batch %s %s: %d answered, %d failed, %d not run; $%.4f at the batch price ($%.4f at sync prices)",
            row.batch_id,
            status.provider_status,
            len(answers),
            len(failed),
            lost,
            cost,
            sync_cost,
        )

    def _cost(self, key: str, completion: Completion, price: Price | None) -> float:
        if price is None:
            return 0.0
        if completion.prompt_tokens is None or completion.completion_tokens is None:
            # No usage reported: charged its worst case, as a sync call would be.
            return Ledger(price, None).max_call_cost(self.messages[key], self.cfg.max_new_tokens)
        return price.cost(completion.prompt_tokens, completion.completion_tokens)

    def _pending_summary(self) -> str:
        rows = self._active()
        ids = ", ".join(str(row.batch_id) for row in rows)  # submitted: every id is set
        return (
            f"{sum(r.requests for r in rows)} requests are in {len(rows)} provider batch(es) ({ids}), "
            f"not waited for (teacher.batch_wait=false / --no-wait). Run the same `distill capture` "
            "again to collect them when they finish; `distill batches RECIPE` shows their status."
        )

    async def _retry(self, fn, *args):
        """A batch API call (upload, status, results, list), retried on 429/5xx/timeouts like a sync call."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.max_retries + 1),
            wait=wait_random_exponential(multiplier=self.cfg.backoff_initial_s, max=self.cfg.backoff_max_s),
            retry=retry_if_exception(lambda e: isinstance(e, TeacherCallError) and e.retryable),
            reraise=True,
        )
        return await retrying(fn, *args)


def _progress(statuses: dict[str, Status], elapsed: float) -> None:
    """One line per poll: requests done/failed/total over the running batches, elapsed, provider status."""
    done = sum(s.done for s in statuses.values())
    failed = sum(s.failed for s in statuses.values())
    total = sum(s.total for s in statuses.values())
    states = ", ".join(sorted({s.provider_status for s in statuses.values()}))
    log.info(
        "batch: %d/%d done, %d failed, %d batch(es) %s, %.0fs elapsed",
        done,
        total,
        failed,
        len(statuses),
        states,
        elapsed,
    )


def record_meta(
    service, conversations: list[list[dict]], samples: list[int], completions: list[Completion]
) -> list[dict]:
    """Per capture record: for a batch answer its provenance ("batch:<id>") and what it would
    have cost as a sync call; {} for the others."""
    keys = service.keys(conversations, samples)
    via = service.cache.provenance(keys)
    price = service.price
    extra: list[dict] = []
    for key, c in zip(keys, completions, strict=True):
        if key not in via:
            extra.append({})
            continue
        sync = price.cost(c.prompt_tokens or 0, c.completion_tokens or 0) if price else 0.0
        extra.append({"provenance": via[key], "sync_cost_usd": sync})
    return extra


# ---------------------------------------------------------------- distill batches


def list_batches(cache: TeacherCache) -> list[BatchRow]:
    return cache.submissions()


def format_batches(rows: list[BatchRow], where) -> str:
    """`distill batches`: one line per batch, newest last; finished ones say what they saved."""
    if not rows:
        return f"no provider batches in {where}"
    header = (
        f"{'batch':<36} {'teacher':<28} {'state':<10} {'status':<12} {'done':>6} {'failed':>6} {'total':>6} "
        f"{'reserved $':>11} {'cost $':>9} {'saved $':>9}  created"
    )
    lines = [header]
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))
        finished = r.state == "imported"
        lines.append(
            f"{r.batch_id or '(' + r.submission[:12] + ')':<36} {r.spec[:28]:<28} "
            f"{'finished' if finished else 'pending':<10} {r.provider_status or r.state:<12} {r.done:>6} "
            f"{r.failed:>6} {r.requests:>6} {r.reserved_usd:>11.4f} "
            f"{(f'{r.cost_usd:.4f}' if finished else '-'):>9} "
            f"{(f'{r.sync_cost_usd - r.cost_usd:.4f}' if finished else '-'):>9}  {created}"
        )
    return "\n".join(lines)


async def refresh(service, cfg, rows: list[BatchRow]) -> None:
    """Ask the provider for the current status of the unfinished batches of this teacher."""
    api = batches_for(service.teacher, cfg)
    try:
        for row in rows:
            if row.state == "submitted" and row.teacher == teacher_key(service.identity):
                assert row.batch_id is not None  # submitted: the provider's id is known
                status = await api.status(row.batch_id)
                service.cache.update_submission(
                    row.submission, provider_status=status.provider_status, done=status.done, failed=status.failed
                )
    finally:
        await api.aclose()


async def cancel(service, cfg, batch_id: str) -> str:
    """Cancel a running batch; the next capture imports what it finished and resubmits the rest."""
    rows = [r for r in service.cache.submissions(teacher_key(service.identity)) if r.batch_id == batch_id]
    if not rows:
        known = ", ".join(r.batch_id or r.submission for r in service.cache.submissions()) or "none"
        raise DistillError(
            f"no batch {batch_id} of teacher {service.teacher.spec} in the teacher cache; known: {known}"
        )
    api = batches_for(service.teacher, cfg)
    try:
        status = await api.cancel(batch_id)
    except TeacherCallError as err:
        raise DistillError(f"cancelling batch {batch_id}: {err}") from None
    finally:
        await api.aclose()
    service.cache.update_submission(rows[0].submission, provider_status=status)
    return status
