"""What serving spends on its teacher (`make test`): a cancelled call gives back its slot and its
reservation, a caller who leaves mid-call is charged what the call cost (not its worst case) and
its answer is cached, an answer capture already bought costs serving nothing, and the serving
ledger survives a restart. Teacher: the fault-injecting loopback server (tests/support/fault_server.py).
"""

from __future__ import annotations

import asyncio
import json

import httpx
from support.fault_server import FaultServer, answer_for
from support.router_helpers import MODEL, TASK, FixedStudent, running, teacher_for

from pipeline.config import PriceConfig
from pipeline.conversation import user_turn
from pipeline.llm.completion import Completion
from pipeline.llm.policy import Policy

PRICE = PriceConfig(input_per_mtok=1000.0, output_per_mtok=1000.0)  # dear: a cent is a few tokens


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def until(condition, what: str, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def _dispatcher(server: FaultServer, concurrency: int, budget_usd: float | None, rpm: int | None = None):
    from pipeline.config import TeacherConfig
    from pipeline.teachers.dispatch import Dispatcher, Limits
    from pipeline.teachers.ledger import Ledger
    from pipeline.teachers.registry import build_teacher

    cfg = TeacherConfig(
        spec="openai:fault",
        base_url=server.base_url,
        price=PRICE,
        max_retries=0,
        logprobs=False,
        max_new_tokens=4,
        timeout_s=30,
    )
    teacher = build_teacher(cfg.spec, cfg)
    limits = Limits(concurrency=concurrency, max_new_tokens=4, rpm=rpm)
    return Dispatcher(teacher, limits, Ledger(teacher.price, budget_usd)), teacher


def test_calls_cancelled_while_throttled_or_waiting_for_budget_give_back_their_slots():
    from pipeline.teachers.dispatch import Job

    answered = []

    async def scenario() -> None:
        with FaultServer(latency_s=1.0) as server:
            # Throttled: 10 requests a minute is one per 6 s; the second call waits for its turn.
            throttled, teacher = _dispatcher(server, concurrency=1, budget_usd=None, rpm=10)
            await throttled.run([Job("a", messages("a"))], lambda job, c: answered.append(job.key))
            waiting = asyncio.create_task(throttled.run([Job("b", messages("b"))], lambda *_: None))
            await until(lambda: throttled.ledger.reserved_usd > 0, "the second call reserved and waits its turn")
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            assert throttled._slots._value == 1 and throttled.ledger.reserved_usd == 0
            await teacher.aclose()

            # Waiting for budget: one worst case fits, two do not; the second waits for the first.
            one = _dispatcher(server, concurrency=2, budget_usd=None)[0].ledger.max_call_cost(messages("c"), 4)
            budgeted, teacher = _dispatcher(server, concurrency=2, budget_usd=one * 1.5)
            first = asyncio.create_task(
                budgeted.run([Job("c", messages("c"))], lambda job, c: answered.append(job.key))
            )
            await until(lambda: server.total == 2, "the first call reached the teacher")
            for key in ("d", "e"):  # two calls cancelled while waiting for the budget
                blocked = asyncio.create_task(budgeted.run([Job(key, messages(key))], lambda *_: None))
                await until(lambda: budgeted._slots._value == 0, f"call {key} holds a slot, waiting for budget")
                blocked.cancel()
                await asyncio.gather(blocked, return_exceptions=True)
                assert budgeted._slots._value == 1, f"cancelled call {key} kept its slot"
            await first
            assert budgeted._slots._value == 2 and budgeted.ledger.reserved_usd == 0
            async with asyncio.timeout(30):  # the next call gets a slot: it does not block forever
                await budgeted.run([Job("f", messages("f"))], lambda job, c: answered.append(job.key))
            await teacher.aclose()

    asyncio.run(scenario())
    assert answered == ["a", "c", "f"]


def test_a_caller_who_leaves_mid_call_is_charged_its_cost_not_its_worst_case_and_the_answer_is_cached(tmp_path):
    from pipeline.config import TeacherConfig
    from pipeline.teachers.service import TeacherService

    async def scenario(server: FaultServer):
        cfg = TeacherConfig(
            spec="openai:fault",
            base_url=server.base_url,
            price=PRICE,
            max_retries=0,
            logprobs=False,
            max_new_tokens=4,
            timeout_s=30,
        )
        service = TeacherService.from_config(cfg, cache_path=tmp_path / "cache.sqlite", charge_cached=False)
        ask = messages("a large prompt the client gave up on " * 50)
        worst = service.ledger.max_call_cost(ask, 4)
        waiting = asyncio.create_task(service.answer([ask]))
        await until(lambda: server.total == 1, "the call reached the teacher")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await until(lambda: service.ledger.reserved_usd == 0, "the call finished in the background")
        cached = service.cache.get_many(service.keys([ask]))
        spent = service.ledger.spent_usd
        await service.aclose()
        return worst, spent, cached

    with FaultServer(latency_s=1.0) as server:
        worst, spent, cached = asyncio.run(scenario(server))
        ((prompt_tokens, completion_tokens),) = server.billed
    assert spent == (prompt_tokens + completion_tokens) * 1000.0 / 1e6 < worst / 2
    (answer,) = cached.values()
    assert answer.text.startswith("ans-") and answer.cost_usd == spent


def test_an_answer_capture_already_bought_costs_serving_nothing(tmp_path):
    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    cache = tmp_path / "teacher_cache.sqlite"
    with FaultServer() as server:
        # Capture bought this answer for $5 (in the cache serving shares with it).
        seed = teacher_for(server, price=PRICE, allow_unpriced=False)
        seed.cache_path = cache
        seed.start()
        (key,) = seed.service.keys([TASK.teacher_messages(user_turn("bought by capture"))])
        seed.service.cache.put_many({key: Completion(text="damaged", source=seed.spec, cost_usd=5.0)})
        seed.service.close()

        teacher = teacher_for(server, price=PRICE, allow_unpriced=False)
        teacher.cache_path, teacher.cfg = cache, teacher.cfg.model_copy(update={"budget_usd": 1.0})
        app = create_app(ServeSettings(max_tokens=8), {MODEL: FixedStudent()}, Policy(threshold=0.0), teacher=teacher)
        with running(app) as url:
            routes = [_ask(url, p) for p in ("bought by capture", "a new one")]
    assert routes == [("teacher", "damaged"), ("teacher", answer_for("a new one"))]
    assert server.total == 1


def test_the_serving_ledger_survives_a_restart(tmp_path):
    from pipeline.router.app import create_app
    from pipeline.router.backends import TeacherBackend
    from pipeline.router.settings import ServeSettings
    from pipeline.teachers.ledger import Ledger, Price

    ledger = tmp_path / "serve_ledger.json"
    worst = Ledger(Price(1000.0, 1000.0, "test"), None).max_call_cost(
        TASK.teacher_messages(user_turn("second day")), 12
    )
    with FaultServer() as server:

        def app():  # one call's worst case fits the budget; a call more does not
            base = teacher_for(server, price=PRICE, allow_unpriced=False)
            teacher = TeacherBackend(
                base.cfg, TASK, tmp_path / "cache.sqlite", budget_usd=worst * 1.1, ledger_path=ledger
            )
            return create_app(
                ServeSettings(max_tokens=8), {MODEL: FixedStudent()}, Policy(threshold=0.0), teacher=teacher
            )

        with running(app()) as url:
            first = _ask(url, "first day")
        spent = json.loads(ledger.read_text())["spent_usd"]
        with running(app()) as url:  # a restart: the spend is read back
            second = _ask(url, "second day")
            gauge = httpx.get(f"{url}/metrics").text
    assert first == ("teacher", answer_for("first day")) and second[0] == "student-fallback"
    assert 0 < spent < worst and server.total == 1
    assert f"distill_teacher_spent_usd {spent}" in gauge


def _ask(url: str, prompt: str) -> tuple[str, str]:
    reply = httpx.post(
        f"{url}/v1/chat/completions", timeout=60, json={"model": MODEL, "max_tokens": 4, "messages": messages(prompt)}
    ).json()
    return reply["distill"]["route"], reply["choices"][0]["message"]["content"]
