"""Soak: many clients sending valid, malformed, oversize, disconnecting and escalating requests at once.

    .venv/bin/python bench/bench_router_soak.py [--requests 2000] [--clients 16] [--quick]

The router serves the tiny random Llama (tests/conftest.py shape) in a child process, under
uvicorn as `distill serve` configures it (http_server.py), with the fault server
(tests/support/fault_server.py: 10% of calls answered 429, 500, slowly or cut off) as its teacher, a
price and a serve.budget_usd that runs out part-way. Its policy's threshold is chosen from the
student's own confidence on a prompt pool (read in this process beforehand), so which requests
escalate is known: "stay" prompts well above it, "escalate" prompts well below. The student
answers as the demo recipe's does: the likeliest of the task's labels, its label_prob the
signal (a random model generating text never stops by itself, and an answer cut off at the
token limit always escalates). Each client sends, at random (seeded):

    valid        a stay prompt (the student answers)                          55%
    escalating   an escalate prompt (the teacher answers, or student-fallback) 20%
    malformed    bad JSON, lax types, a lone surrogate, system-only, n=2, an unknown model  10%
    oversize     a 2 MB chunked body, or a ~9k-token prompt                    5%
    disconnect   a valid or escalating request, the socket closed right after sending it  10%

Checked, and written to bench/results/router_soak.json (bench/harness.py envelope):
- 0 5xx (and only 200) on valid and escalating requests; malformed and oversize get their 4xx;
- every answer the client got from the teacher is in the escalation log exactly once (no
  duplicates; the only other records are of disconnected clients);
- the spend never passes serve.budget_usd: the ledger file and the fault server's own bill;
- the server's RSS, sampled every 10% of the run: growth from the end of a warm-up (the first 20%,
  while the allocator's arenas grow to the concurrency's working set) to the end, under RSS_BOUND_MIB.
Requests by outcome and the p50/p99 latency of valid ones are recorded. The small version of
this run is tests/router/test_router_soak.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402
from bench_router import free_port, tiny_model  # noqa: E402
from support.fault_server import FaultServer  # noqa: E402

MODEL = "distill-student"
MAX_TOKENS = 6
PRICE = (1000.0, 1000.0)  # US$ per 1M tokens in/out: a call costs cents, so the budget runs out part-way
BUDGET_USD = 2.0
RSS_BOUND_MIB = 64.0  # stated bound: RSS growth from the end of the warm-up to the end of the run
WARMUP_SHARE = 0.2
LABELS = ("damaged", "late", "other")
# Between a pool prompt's label_prob and the threshold: a random model's all lie close together,
# and a micro-batch moves one by ~1e-6.
MARGIN = 0.0005
MIX = (("valid", 55), ("escalating", 20), ("malformed", 10), ("oversize", 5), ("disconnect", 10))
MALFORMED = ("bad_json", "max_tokens_true", "stream_yes", "lone_surrogate", "system_only", "n_2", "unknown_model")
TOPICS = (
    "parcel",
    "order",
    "refund",
    "invoice",
    "delivery",
    "account",
    "password",
    "subscription",
    "voucher",
    "return",
    "warranty",
    "receipt",
)
MOODS = (
    "arrived broken",
    "never came",
    "was charged twice",
    "is late again",
    "cannot be opened",
    "shows the wrong address",
    "got cancelled",
    "is missing a part",
)


# ---------------------------------------------------------------- the prompt pool


@dataclass
class Pool:
    threshold: float
    stay: list[str]
    escalate: list[str]


def policy(threshold: float | None):
    from pipeline.llm.policy import Policy

    return Policy(threshold=threshold, signal="label_prob", labels=LABELS, decode="label_posterior")


def prompt_pool(folder: Path, size: int) -> Pool:
    """Candidate prompts scored by the student as it will serve them; the threshold is the median."""
    import torch

    from pipeline.llm.answer import Serving, answer_as_served
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model(str(folder), device_plan()).eval(), load_tokenizer(str(folder))
    candidates = [
        f"My {t} {m}, ticket {n}." for n in range(size // (len(TOPICS) * len(MOODS)) + 1) for t in TOPICS for m in MOODS
    ][:size]
    serving = Serving("label_posterior", LABELS, MAX_TOKENS, 16)
    answers = answer_as_served(model, tokenizer, [[{"role": "user", "content": c}] for c in candidates], serving)
    scores = [policy(0.0).score(a) for a in answers]
    threshold = statistics.median(scores)
    return Pool(
        threshold,
        [c for c, s in zip(candidates, scores) if s >= threshold + MARGIN],
        [c for c, s in zip(candidates, scores) if s <= threshold - MARGIN],
    )


# ---------------------------------------------------------------- the router (child process)


def _serve(folder: str, threshold: float, teacher_url: str, work: str, port: int) -> None:
    import logging

    import torch
    import uvicorn

    from pipeline.config import PriceConfig, TeacherConfig
    from pipeline.router.app import create_app
    from pipeline.router.backends import StudentBackend, TeacherBackend
    from pipeline.router.escalations import EscalationLog
    from pipeline.router.http_server import uvicorn_config
    from pipeline.router.settings import ServeSettings
    from pipeline.task import Task

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    task = Task(name="soak", instructions="Classify the support message.", labels=list(LABELS))
    cfg = TeacherConfig(
        spec="openai:fault",
        base_url=teacher_url,
        price=PriceConfig(input_per_mtok=PRICE[0], output_per_mtok=PRICE[1]),
        max_retries=2,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        timeout_s=1.0,
        logprobs=False,
        max_new_tokens=MAX_TOKENS,
    )
    teacher = TeacherBackend(
        cfg, task, Path(work) / "cache.sqlite", budget_usd=BUDGET_USD, ledger_path=Path(work) / "ledger.json"
    )
    settings = ServeSettings(
        max_tokens=8, max_prompt_tokens=400, deadline_s=10.0, max_queue=64, header_timeout_s=5.0, body_timeout_s=5.0
    )
    student = StudentBackend(Path(folder), score_labels=list(LABELS), max_batch=8, decode="label_posterior")
    app = create_app(
        settings,
        {MODEL: student},
        policy(threshold),
        teacher=teacher,
        escalations=EscalationLog(Path(work) / "escalations.jsonl"),
    )
    uvicorn.Server(uvicorn_config(app, settings, "127.0.0.1", port, log_level="error")).run()


class Router:
    def __init__(self, folder: Path, threshold: float, teacher_url: str, work: Path):
        self.port = free_port()
        self.proc = mp.get_context("spawn").Process(
            target=_serve, args=(str(folder), threshold, teacher_url, str(work), self.port), daemon=True
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Router:
        self.proc.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise SystemExit("the router did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.join(30)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


# ---------------------------------------------------------------- the clients


@dataclass
class Outcome:
    kind: str
    detail: str
    status: int | None  # None: no answer read (a disconnecting client)
    request_id: str
    route: str | None = None
    latency_ms: float = 0.0


@dataclass
class Drive:
    outcomes: list[Outcome] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)


def _body(text: str, **extra) -> dict:
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": text}], **extra}


def _malformed(kind: str) -> tuple[bytes | dict, int]:
    """(the body, the status it must get)."""
    return {
        "bad_json": (b'{"model": "distill-student", "messages": [', 400),
        "max_tokens_true": (_body("hi", max_tokens=True), 400),
        "stream_yes": (_body("hi", stream="yes"), 400),
        "lone_surrogate": (_body("broken \ud800 parcel"), 400),
        "system_only": ({"model": MODEL, "messages": [{"role": "system", "content": "be nice"}]}, 400),
        "n_2": (_body("hi", n=2), 400),
        "unknown_model": ({**_body("hi"), "model": "gpt-4o"}, 404),
    }[kind]


def _post(http: httpx.Client, url: str, body, request_id: str) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(
        f"{url}/v1/chat/completions",
        content=data,
        timeout=60,
        headers={"content-type": "application/json", "x-request-id": request_id},
    )


def _chunked(http: httpx.Client, url: str, request_id: str) -> httpx.Response:
    data = json.dumps(_body("x" * 2_000_000)).encode()
    return http.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        content=(data[i : i + 65536] for i in range(0, len(data), 65536)),
        headers={"content-type": "application/json", "x-request-id": request_id},
    )


def _hang_up(url: str, body: dict, request_id: str, rng: random.Random) -> None:
    """Send a whole request, then close the socket without reading (at once, or a few ms later)."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"x-request-id: {request_id}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        time.sleep(rng.choice((0.0, 0.005, 0.02)))


def drive(url: str, pool: Pool, requests: int, clients: int, seed: int = 0, on_progress=None) -> list[Outcome]:
    """`requests` requests over `clients` threads, each a keep-alive httpx client; `on_progress(done)`
    is called after every request (the RSS sampler)."""
    kinds = [k for k, share in MIX for _ in range(share)]
    counter = iter(range(requests))
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        with httpx.Client() as http:
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                outcome = one(http, rng, f"soak-{n:05d}")
                with lock:
                    outcomes.append(outcome)
                    done = len(outcomes)
                if on_progress is not None:
                    on_progress(done)

    def one(http: httpx.Client, rng: random.Random, request_id: str) -> Outcome:
        kind = rng.choice(kinds)
        started = time.perf_counter()
        if kind in ("valid", "escalating"):
            prompt = rng.choice(pool.stay if kind == "valid" else pool.escalate)
            reply = _post(http, url, _body(prompt), request_id)
            return Outcome(
                kind,
                prompt,
                reply.status_code,
                request_id,
                reply.headers.get("x-distill-route"),
                (time.perf_counter() - started) * 1000,
            )
        if kind == "malformed":
            detail = rng.choice(MALFORMED)
            body, _ = _malformed(detail)
            return Outcome(kind, detail, _post(http, url, body, request_id).status_code, request_id)
        if kind == "oversize":
            if rng.random() < 0.5:
                return Outcome(kind, "chunked_2mb", _chunked(http, url, request_id).status_code, request_id)
            return Outcome(
                kind, "9k_tokens", _post(http, url, _body("refund " * 9000), request_id).status_code, request_id
            )
        prompt = rng.choice(pool.escalate if rng.random() < 0.5 else pool.stay)
        _hang_up(url, _body(prompt), request_id, rng)
        return Outcome(kind, prompt, None, request_id)

    with ThreadPoolExecutor(clients) as threads:
        list(threads.map(client, range(clients)))
    return outcomes


# ---------------------------------------------------------------- the checks


EXPECTED = {"malformed": {d: _malformed(d)[1] for d in MALFORMED}, "oversize": {"chunked_2mb": 413, "9k_tokens": 400}}


def check(outcomes: list[Outcome], work: Path, server: FaultServer) -> dict:
    """The soak's figures and its verdicts (each False names a broken promise)."""
    from pipeline.artifacts import read_jsonl

    by_kind = Counter(o.kind for o in outcomes)
    statuses = Counter(f"{o.kind}:{o.status}" for o in outcomes if o.status is not None)
    answered = [o for o in outcomes if o.kind in ("valid", "escalating")]
    valid_5xx = sum(1 for o in answered if o.status >= 500)
    wrong = [o for o in outcomes if o.kind in EXPECTED and o.status != EXPECTED[o.kind][o.detail]]
    routes = Counter(o.route for o in answered)
    log_path = work / "escalations.jsonl"
    logged = [r["id"] for r in read_jsonl(log_path)] if log_path.exists() else []
    teacher_answered = {o.request_id for o in answered if o.route == "teacher"}
    disconnected = {o.request_id for o in outcomes if o.kind == "disconnect"}
    ledger = json.loads((work / "ledger.json").read_text())["spent_usd"] if (work / "ledger.json").exists() else 0.0
    billed = server.billed_usd(*PRICE)
    latencies = sorted(o.latency_ms for o in answered if o.status == 200)
    return {
        "requests": len(outcomes),
        "by_kind": dict(by_kind),
        "by_status": dict(sorted(statuses.items())),
        "valid_routes": {str(k): v for k, v in routes.items()},
        "misrouted": sum(1 for o in answered if (o.route == "student") != (o.kind == "valid")),
        "valid_5xx": valid_5xx,
        "valid_non_200": sum(1 for o in answered if o.status != 200),
        "wrong_status": len(wrong),
        "wrong_status_examples": [f"{o.kind}/{o.detail}: {o.status}" for o in wrong[:5]],
        "escalations_answered_by_teacher": len(teacher_answered),
        "log_records": len(logged),
        "log_duplicates": len(logged) - len(set(logged)),
        "escalations_missing_from_log": len(teacher_answered - set(logged)),
        "log_records_of_disconnected_clients": len(set(logged) & disconnected),
        "log_records_unexplained": len(set(logged) - teacher_answered - disconnected),
        "budget_usd": BUDGET_USD,
        "ledger_spent_usd": round(ledger, 6),
        "teacher_billed_usd": round(billed, 6),
        "teacher_requests": server.total,
        "teacher_faults": dict(server.faulted),
        "valid_latency_ms": {
            "n": len(latencies),
            "p50": round(statistics.median(latencies), 2),
            "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 2),
        },
    }


def verdicts(result: dict) -> dict[str, bool]:
    return {
        "no_5xx_on_valid": result["valid_5xx"] == 0 and result["valid_non_200"] == 0,
        "refusals_as_expected": result["wrong_status"] == 0,
        "routes_as_chosen": result["misrouted"] == 0,
        "every_escalation_logged_once": result["log_duplicates"] == 0
        and result["escalations_missing_from_log"] == 0
        and result["log_records_unexplained"] == 0,
        "budget_never_exceeded": result["ledger_spent_usd"] <= result["budget_usd"]
        and result["teacher_billed_usd"] <= result["budget_usd"],
    }


def soak(requests: int, clients: int, work: Path, sample_rss: bool = True, pool_size: int = 600) -> dict:
    folder = tiny_model(work / "tiny")
    pool = prompt_pool(folder, pool_size)
    with (
        FaultServer(fault_rate=0.1, slow_s=1.5, seed=1) as server,
        Router(folder, pool.threshold, server.base_url, work) as router,
    ):
        rss: list[tuple[int, float]] = []
        every = max(requests // 10, 1)

        def on_progress(done: int) -> None:
            if sample_rss and done % every == 0:
                rss.append((done, round(router.rss_mib(), 1)))

        started = time.perf_counter()
        outcomes = drive(router.url, pool, requests, clients, on_progress=on_progress)
        wall = time.perf_counter() - started
        result = check(outcomes, work, server)
    result.update(
        clients=clients,
        wall_s=round(wall, 1),
        pool={"stay": len(pool.stay), "escalate": len(pool.escalate), "threshold": round(pool.threshold, 4)},
    )
    if rss:
        warm = [m for n, m in rss if n >= WARMUP_SHARE * requests]
        result["rss_mib"] = {
            "samples": [{"after_requests": n, "mib": m} for n, m in rss],
            "warmup_requests": int(WARMUP_SHARE * requests),
            "after_warmup": warm[0],
            "end": warm[-1],
            "growth": round(warm[-1] - warm[0], 1),
            "bound": RSS_BOUND_MIB,
        }
    result["verdicts"] = verdicts(result)
    if rss:
        result["verdicts"]["rss_flat"] = result["rss_mib"]["growth"] <= RSS_BOUND_MIB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="Requests in all (default 2000, quick 200).")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients.")
    harness.add_arguments(parser)
    args = parser.parse_args()
    requests = args.requests or (200 if args.quick else 2000)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as work:
        result = soak(requests, args.clients, Path(work))
    print(json.dumps(result, indent=2))
    harness.write("router_soak", result, args)
    if not all(result["verdicts"].values()):
        raise SystemExit(f"soak failed: {[k for k, ok in result['verdicts'].items() if not ok]}")


if __name__ == "__main__":
    main()
