"""Who answers one request, FastAPI-free: the mode, the student, the policy, the teacher.

    distill serve RECIPE            (app.py builds one Router per app)

    live / canary-in   student answers -> policy.decide -> student, or escalate: teacher
                       answers; teacher failed / over budget / past the deadline ->
                       the student's answer, marked student-fallback
    off / canary-out   teacher answers; teacher failed -> student-fallback
    shadow             teacher answers; the student runs in the background, both logged
    tiers (serve.tiers) live / canary-in, the student escalated: each tier in order answers
                       and its own policy decides; kept -> route tier:<name>, else (or the
                       tier failed / timed out) the next tier; the teacher, last, answers;
                       teacher failed -> the highest tier's answer, marked <tier>-fallback

Every teacher answer obtained is appended to the escalations log (the loop into training
data). The whole route is decided before the app sends a byte, so a streamed answer never
switches system mid-stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace

from pipeline.conversation import student_messages
from pipeline.llm.completion import Completion
from pipeline.llm.policy import Decision, Policy
from pipeline.router.backends import Backend, TeacherBackend
from pipeline.router.errors import DeadlineExceeded
from pipeline.router.escalations import Escalation, EscalationLog, agrees
from pipeline.router.metrics import RouterMetrics
from pipeline.router.modes import Mode, Rollback

log = logging.getLogger(__name__)


def policy_hash(policy: Policy) -> str:
    """Short content hash of the policy, sent in x-distill-policy and logged with each escalation."""
    return hashlib.sha256(json.dumps(asdict(policy), sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Ask:
    """One request as the router sees it."""

    request_id: str
    key: str  # canary bucket key: the client's `user`, else the request id
    # Every turn as the client sent it. The student answers it in the shape its policy was
    # evaluated on (`student_messages`, policy.student_input); the teacher is asked it as sent.
    conversation: list[dict[str, str]]
    max_tokens: int
    deadline: float  # time.monotonic() by which an answer must be chosen
    deadline_s: float = 30.0  # the window that deadline closes (a teacher-only fallback gets a fresh one)
    # The policy this request is decided with, fixed when routing starts, so a reload mid-request
    # never mixes two policies in one answer (Router.route fills these unless the caller did:
    # a registry version brings its own policy).
    policy: Policy | None = None
    policy_hash: str = ""
    model_version: str | None = None  # the registry version answering, when serving by alias
    # None: no token logprobs asked; k: the student returns its tokens, with k alternatives each.
    top_logprobs: int | None = None
    request: dict | None = None  # the sent parameters that change the answer, for the escalation record


@dataclass(frozen=True)
class Tier:
    """An intermediate tier (serve.tiers): a model between the student and the teacher, kept
    when its own policy keeps its answer."""

    name: str
    backend: Backend
    policy: Policy
    timeout_s: float | None = None  # None: what is left of the request's deadline
    policy_hash: str = ""

    @classmethod
    def of(cls, name: str, backend: Backend, policy: Policy, timeout_s: float | None = None) -> Tier:
        return cls(name, backend, policy, timeout_s, policy_hash(policy))

    @property
    def route(self) -> str:
        return f"tier:{self.name}"


@dataclass(frozen=True)
class Routed:
    answer: Completion
    route: str  # student | teacher | student-fallback; with tiers also tier:<name> | tier:<name>-fallback
    reason: str
    confidence: float | None = None
    mode: Mode = Mode("live")  # the mode this request was routed under (a rollback may change it later)
    policy_hash: str = ""
    # Route teacher: where the answer came from (the teacher spec's provider; `logs` is a dataset
    # standing in for a teacher, a simulation). None on every other route.
    source: str | None = None


class Router:
    def __init__(
        self,
        policy: Policy,
        mode: Mode,
        metrics: RouterMetrics,
        teacher: TeacherBackend | None = None,
        escalations: EscalationLog | None = None,
        rollback: Rollback | None = None,
        tiers: tuple[Tier, ...] = (),
    ):
        self.tiers = tuple(tiers)  # between the student and the teacher, in order
        self._current = (policy, policy_hash(policy))  # swapped as one tuple: atomic on the event loop
        self.mode = mode
        self.metrics = metrics
        self.teacher = teacher
        self.escalations = escalations
        self.rollback = rollback
        self._background: set[asyncio.Task] = set()  # shadow students: held so they are not collected

    @property
    def policy(self) -> Policy:
        return self._current[0]

    @property
    def policy_hash(self) -> str:
        return self._current[1]

    def swap_policy(self, policy: Policy) -> str:
        """Requests already routing keep the policy they started with; new ones get this one."""
        previous = self.policy_hash
        self._current = (policy, policy_hash(policy))
        log.info(
            "policy %s replaced by %s (%s threshold %s)", previous, self.policy_hash, policy.signal, policy.threshold
        )
        return previous

    def with_policy(self, ask: Ask) -> Ask:
        """The request with the policy it will be decided by (the current one unless it has its own)."""
        if ask.policy is not None:
            return ask
        policy, digest = self._current
        return replace(ask, policy=policy, policy_hash=digest)

    async def route(self, student: Backend, ask: Ask) -> Routed:
        mode = self.mode
        ask = self.with_policy(ask)
        if mode.routed(ask.key):
            routed = await self._routed(student, ask)
        elif mode.kind == "shadow":
            routed = await self._shadow(student, ask)
        else:
            routed = await self._teacher_only(
                student, ask, "canary: not routed" if mode.kind == "canary" else "mode off"
            )
        source = self.teacher.source if routed.route == "teacher" and self.teacher is not None else None
        return replace(routed, mode=mode, policy_hash=ask.policy_hash, source=source)

    # ------------------------------------------------------------ modes

    async def _routed(self, student: Backend, ask: Ask) -> Routed:
        answer = await self._student(student, ask)
        decision = self._decide(ask, answer)
        if decision.route == "student":
            if self.teacher is not None:
                self.metrics.saved_usd.inc(self.teacher.estimated_cost(ask.conversation, answer.completion_tokens or 1))
            return Routed(answer, "student", decision.reason, decision.score)
        if self.tiers:
            return await self._tiered(ask, answer, decision)
        if self.teacher is None:
            return Routed(answer, "student-fallback", f"{decision.reason}; no teacher configured", decision.score)
        teacher = await self._teacher(ask)
        if teacher.error is not None:
            return Routed(
                answer, "student-fallback", f"{decision.reason}; teacher failed: {teacher.error}", decision.score
            )
        self._log(ask, teacher, "teacher", decision.reason, decision.score, answer)
        return Routed(teacher, "teacher", decision.reason, decision.score)

    async def _tiered(self, ask: Ask, student: Completion, decision: Decision) -> Routed:
        """The student escalated: each tier in turn, then the teacher. Every step (tried, kept or
        passed on, its confidence) goes into the escalation record's meta.tiers."""
        steps = [_step("student", ask.policy_hash, decision, student)]
        route, best, last = "student", student, decision  # the highest tier that answered: the fallback
        reasons = [f"student: {decision.reason}"]
        for tier in self.tiers:
            try:
                answer = await self._tier(tier, ask)
            except Exception as err:  # noqa: BLE001  a tier down, timing out or broken passes the request on
                error = "timed out" if isinstance(err, TimeoutError) else f"{type(err).__name__}: {err}"
                log.warning("request %s: tier %s failed (%s); passing on", ask.request_id, tier.name, error)
                self.metrics.errors.labels(f"tier_{tier.name}").inc()
                steps.append({"tier": tier.name, "outcome": "failed", "error": error, "policy": tier.policy_hash})
                reasons.append(f"{tier.name}: failed ({error})")
                continue
            verdict = tier.policy.decide(answer)
            steps.append(_step(tier.name, tier.policy_hash, verdict, answer))
            reasons.append(f"{tier.name}: {verdict.reason}")
            if verdict.route == "student":
                if self.teacher is not None:
                    self.metrics.saved_usd.inc(
                        self.teacher.estimated_cost(ask.conversation, answer.completion_tokens or 1)
                    )
                return Routed(answer, tier.route, "; ".join(reasons), verdict.score)
            route, best, last = tier.route, answer, verdict
        reason = "; ".join(reasons)
        if self.teacher is None:
            return Routed(best, f"{route}-fallback", f"{reason}; no teacher configured", last.score)
        teacher = await self._teacher(ask)
        if teacher.error is not None:
            return Routed(best, f"{route}-fallback", f"{reason}; teacher failed: {teacher.error}", last.score)
        self._log(ask, teacher, "teacher", reason, last.score, student, tiers=tuple(steps))
        return Routed(teacher, "teacher", reason, last.score)

    async def _tier(self, tier: Tier, ask: Ask) -> Completion:
        started = time.monotonic()
        window = max(ask.deadline - started, 0.001)
        if tier.timeout_s is not None:
            window = min(window, tier.timeout_s)
        top = ask.top_logprobs
        if top is not None and tier.backend.max_top_logprobs is not None:
            top = min(top, tier.backend.max_top_logprobs)
        else:
            top = None  # a tier that returns no tokens answers without them (logprobs null, as the teacher's)
        messages = student_messages(ask.conversation, tier.policy.student_input)
        async with asyncio.timeout(window):
            if top is None:
                answer = await tier.backend.complete(messages, ask.max_tokens)
            else:
                answer = await tier.backend.complete(messages, ask.max_tokens, top_logprobs=top)
        self.metrics.latency.labels(f"tier_{tier.name}").observe(time.monotonic() - started)
        self._count_tokens(tier.route, answer)
        return answer

    async def _teacher_only(self, student: Backend, ask: Ask, reason: str) -> Routed:
        teacher = await self._teacher(ask)
        if teacher.error is None:
            self._log(ask, teacher, "teacher", reason, None, None)
            return Routed(teacher, "teacher", reason)
        # The teacher may have used the whole window: the student gets a fresh one rather than
        # turning a degraded answer into a 504 (so a teacher-only fallback takes up to 2 windows).
        answer = await self._student(student, replace(ask, deadline=time.monotonic() + ask.deadline_s))
        return Routed(answer, "student-fallback", f"{reason}; teacher failed: {teacher.error}")

    async def _shadow(self, student: Backend, ask: Ask) -> Routed:
        shadow = asyncio.create_task(self._student(student, ask))
        try:
            teacher = await self._teacher(ask)
        except asyncio.CancelledError:
            shadow.cancel()  # the client left: its shadow answer would be compared with nothing
            raise
        if teacher.error is not None:
            answer = await shadow
            decision = self._decide(ask, answer)
            return Routed(answer, "student-fallback", f"shadow; teacher failed: {teacher.error}", decision.score)
        # The client gets the teacher now; the student's answer is compared and logged when it lands.
        task = asyncio.create_task(self._log_shadow(ask, teacher, shadow))
        self._background.add(task)
        task.add_done_callback(self._finished)
        return Routed(teacher, "teacher", "shadow")

    def _finished(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.metrics.errors.labels("shadow").inc()
            log.error("shadow comparison failed", exc_info=task.exception())

    async def _log_shadow(self, ask: Ask, teacher: Completion, shadow: asyncio.Task) -> None:
        try:
            answer = await shadow
        except DeadlineExceeded:
            self.metrics.errors.labels("shadow_student_deadline").inc()
            self._log(ask, teacher, "teacher", "shadow; student past the deadline", None, None)
            return
        decision = self._decide(ask, answer)
        self._log(
            ask, teacher, "teacher", f"shadow; policy would {decision.route}: {decision.reason}", decision.score, answer
        )
        if decision.route == "student" and self.rollback is not None:
            # Only answers the policy would have kept count: the quality target is about those.
            if self.rollback.observe(agrees(answer, teacher)):
                self._roll_back()
            if self.rollback.agreement is not None:
                self.metrics.rolling_agreement.set(self.rollback.agreement)

    def _roll_back(self) -> None:
        rollback = self.rollback
        # Called when it trips, which takes a target and a full window.
        assert rollback is not None and rollback.agreement is not None and rollback.target is not None
        log.warning(
            "rollback: student agreed with the teacher on %.1f%% of the last %d shadowed answers it would "
            "have kept, below the policy's target %.1f%%; serve.mode is now off (teacher only)",
            100 * rollback.agreement,
            len(rollback.recent),
            100 * rollback.target,
        )
        self.mode = Mode("off", 0.0)
        self.metrics.rolled_back.set(1)

    # ------------------------------------------------------------ steps

    def _decide(self, ask: Ask, answer: Completion) -> Decision:
        assert ask.policy is not None  # route() fixed it (with_policy)
        decision = ask.policy.decide(answer)
        self.metrics.decided(decision.route == "escalate", decision.score, ask.policy.signal)
        return decision

    async def _student(self, student: Backend, ask: Ask) -> Completion:
        started = time.monotonic()
        assert ask.policy is not None  # route() fixed it (with_policy)
        messages = student_messages(ask.conversation, ask.policy.student_input)  # the shape it was trained on
        try:
            async with asyncio.timeout(max(ask.deadline - started, 0.001)):
                if ask.top_logprobs is None:  # the plain call: any Backend, however minimal, takes it
                    answer = await student.complete(messages, ask.max_tokens)
                else:
                    answer = await student.complete(messages, ask.max_tokens, top_logprobs=ask.top_logprobs)
        except TimeoutError:  # counted once, as deadline_exceeded, where it is answered
            raise DeadlineExceeded("the student did not answer within serve.deadline_s") from None
        self.metrics.latency.labels("student").observe(time.monotonic() - started)
        self._count_tokens("student", answer)
        return answer

    async def _teacher(self, ask: Ask) -> Completion:
        # A mode that asks the teacher is refused without one (create_app); routed checks first.
        assert self.teacher is not None
        started = time.monotonic()
        answer = await self.teacher.answer(ask.conversation, ask.deadline - started)
        self.metrics.latency.labels("teacher").observe(time.monotonic() - started)
        if answer.error is not None:
            # The error text is the provider's (keys scrubbed), never the prompt.
            log.warning("request %s: teacher failed (%s)", ask.request_id, answer.error)
            self.metrics.errors.labels("teacher").inc()
        else:
            self._count_tokens("teacher", answer)
        return answer

    def _count_tokens(self, system: str, answer: Completion) -> None:
        for kind, n in answer.usage.items():
            self.metrics.tokens.labels(system, kind.removesuffix("_tokens")).inc(n)

    def _log(
        self,
        ask: Ask,
        teacher: Completion,
        route: str,
        reason: str,
        confidence: float | None,
        student: Completion | None,
        tiers: tuple[dict, ...] | None = None,
    ) -> None:
        if student is not None:
            self.metrics.agreement.labels(str(agrees(student, teacher)).lower()).inc()
        if self.escalations is None:
            return
        self.escalations.append(
            Escalation(
                request_id=ask.request_id,
                conversation=ask.conversation,
                teacher=teacher,
                route=route,
                reason=reason,
                policy=ask.policy_hash,
                confidence=confidence,
                student=student,
                model_version=ask.model_version,
                tiers=tiers,
                request=ask.request,
            )
        )

    async def aclose(self) -> None:
        """Close the tiers' connections (upstream clients); in-process tiers hold none."""
        for tier in self.tiers:
            close = getattr(tier.backend, "aclose", None)
            if close is not None:
                await close()

    async def drain(self) -> None:
        """Let background shadow comparisons finish (shutdown, tests)."""
        if self._background:
            # Failures were already logged by _finished; here we only wait.
            await asyncio.wait(set(self._background))


def _step(name: str, digest: str, decision: Decision, answer: Completion) -> dict:
    """One tier's part in an escalation, as meta.tiers records it."""
    score = decision.score if decision.score is not None and math.isfinite(decision.score) else None
    return {
        "tier": name,
        "outcome": "answered" if decision.route == "student" else "escalated",
        "confidence": score,
        "reason": decision.reason,
        "policy": digest,
        "answer": answer.text,
    }
