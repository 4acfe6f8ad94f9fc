"""Who answers one request, FastAPI-free: the mode, the student, the policy, the teacher.

    distill serve RECIPE            (app.py builds one Router per app)

    live / canary-in   student answers -> policy.decide -> student, or escalate: teacher
                       answers; teacher failed / over budget / past the deadline ->
                       the student's answer, marked student-fallback
    off / canary-out   teacher answers; teacher failed -> student-fallback
    shadow             teacher answers; the student runs in the background, both logged

Every teacher answer obtained is appended to the escalations log (the loop into training
data). The whole route is decided before the app sends a byte, so a streamed answer never
switches system mid-stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace

from pipeline.llm.completion import Completion
from pipeline.router.backends import Backend, TeacherBackend
from pipeline.router.errors import DeadlineExceeded
from pipeline.router.escalations import Escalation, EscalationLog, agrees
from pipeline.router.metrics import RouterMetrics
from pipeline.router.modes import Mode, Rollback
from pipeline.router.policy import Decision, Policy

log = logging.getLogger(__name__)


def policy_hash(policy: Policy) -> str:
    """Short content hash of the policy, sent in x-distill-policy and logged with each escalation."""
    return hashlib.sha256(json.dumps(asdict(policy), sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Ask:
    """One request as the router sees it."""

    request_id: str
    key: str  # canary bucket key: the client's `user`, else the request id
    prompt: str  # the last user message (the teacher is asked about this)
    messages: list[dict[str, str]]  # what the student answers (the client's messages)
    max_tokens: int
    deadline: float  # time.monotonic() by which an answer must be chosen
    deadline_s: float = 30.0  # the window that deadline closes (a teacher-only fallback gets a fresh one)
    # The policy this request is decided with, fixed when routing starts, so a reload mid-request
    # never mixes two policies in one answer (Router.route fills these unless the caller did:
    # a registry version brings its own policy).
    policy: Policy | None = None
    policy_hash: str = ""
    model_version: str | None = None  # the registry version answering, when serving by alias


@dataclass(frozen=True)
class Routed:
    answer: Completion
    route: str  # student | teacher | student-fallback
    reason: str
    confidence: float | None = None
    mode: Mode = Mode("live")  # the mode this request was routed under (a rollback may change it later)
    policy_hash: str = ""


class Router:
    def __init__(self, policy: Policy, mode: Mode, metrics: RouterMetrics, teacher: TeacherBackend | None = None,
                 escalations: EscalationLog | None = None, rollback: Rollback | None = None):
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
        log.info("policy %s replaced by %s (%s threshold %s)", previous, self.policy_hash, policy.signal,
                 policy.threshold)
        return previous

    async def route(self, student: Backend, ask: Ask) -> Routed:
        mode = self.mode
        if ask.policy is None:
            policy, digest = self._current
            ask = replace(ask, policy=policy, policy_hash=digest)
        if mode.routed(ask.key):
            routed = await self._routed(student, ask)
        elif mode.kind == "shadow":
            routed = await self._shadow(student, ask)
        else:
            routed = await self._teacher_only(student, ask, "canary: not routed" if mode.kind == "canary" else "mode off")
        return replace(routed, mode=mode, policy_hash=ask.policy_hash)

    # ------------------------------------------------------------ modes

    async def _routed(self, student: Backend, ask: Ask) -> Routed:
        answer = await self._student(student, ask)
        decision = self._decide(ask, answer)
        if decision.route == "student":
            if self.teacher is not None:
                self.metrics.saved_usd.inc(self.teacher.estimated_cost(ask.prompt, answer.completion_tokens or 1))
            return Routed(answer, "student", decision.reason, decision.score)
        if self.teacher is None:
            return Routed(answer, "student-fallback", f"{decision.reason}; no teacher configured", decision.score)
        teacher = await self._teacher(ask)
        if teacher.error is not None:
            return Routed(answer, "student-fallback", f"{decision.reason}; teacher failed: {teacher.error}",
                          decision.score)
        self._log(ask, teacher, "teacher", decision.reason, decision.score, answer)
        return Routed(teacher, "teacher", decision.reason, decision.score)

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
        teacher = await self._teacher(ask)
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
        self._log(ask, teacher, "teacher", f"shadow; policy would {decision.route}: {decision.reason}",
                  decision.score, answer)
        if decision.route == "student" and self.rollback is not None:
            # Only answers the policy would have kept count: the quality target is about those.
            if self.rollback.observe(agrees(answer, teacher)):
                self._roll_back()
            if self.rollback.agreement is not None:
                self.metrics.rolling_agreement.set(self.rollback.agreement)

    def _roll_back(self) -> None:
        log.warning("rollback: student agreed with the teacher on %.1f%% of the last %d shadowed answers it would "
                    "have kept, below the policy's target %.1f%%; serve.mode is now off (teacher only)",
                    100 * self.rollback.agreement, len(self.rollback.recent), 100 * self.rollback.target)
        self.mode = Mode("off", 0.0)
        self.metrics.rolled_back.set(1)

    # ------------------------------------------------------------ steps

    def _decide(self, ask: Ask, answer: Completion) -> Decision:
        decision = ask.policy.decide(answer)
        self.metrics.decided(decision.route == "escalate", decision.score)
        return decision

    async def _student(self, student: Backend, ask: Ask) -> Completion:
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(ask.deadline - started, 0.001)):
                answer = await student.complete(ask.messages, ask.max_tokens)
        except TimeoutError:
            self.metrics.errors.labels("student_deadline").inc()
            raise DeadlineExceeded("the student did not answer within serve.deadline_s") from None
        self.metrics.latency.labels("student").observe(time.monotonic() - started)
        self._count_tokens("student", answer)
        return answer

    async def _teacher(self, ask: Ask) -> Completion:
        started = time.monotonic()
        answer = await self.teacher.answer(ask.prompt, ask.deadline - started)
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

    def _log(self, ask: Ask, teacher: Completion, route: str, reason: str, confidence: float | None,
             student: Completion | None) -> None:
        if student is not None:
            self.metrics.agreement.labels(str(agrees(student, teacher)).lower()).inc()
        if self.escalations is None:
            return
        self.escalations.append(Escalation(
            request_id=ask.request_id, prompt=ask.prompt, teacher=teacher, route=route, reason=reason,
            policy=ask.policy_hash, confidence=confidence, student=student, model_version=ask.model_version))

    async def drain(self) -> None:
        """Let background shadow comparisons finish (shutdown, tests)."""
        if self._background:
            # Failures were already logged by _finished; here we only wait.
            await asyncio.wait(set(self._background))
