"""What the router adds on the request path, timed from the client over loopback HTTP.

    .venv/bin/python bench/bench_router.py [--n 200] [--n-model 40] [--arms layer,escalation,model,batching,proxy] [--quick]

Each server runs in its own process (uvicorn, log level warning); the client is this process
with one keep-alive httpx client per worker thread. Arms of one comparison are interleaved
request by request, so a busy minute on a shared machine hits both alike.

(b) the router layer alone: the router app over a null student (an instant, fixed answer,
    student-only policy) vs a bare FastAPI endpoint returning a same-shaped body; at
    concurrency 1 and 4. Anchor: LiteLLM's published proxy overhead, 2 ms median / 8 ms p95.
(a) the router serving the tiny random Llama (tests/conftest.py shape) vs calling
    generate_batch in this process on the same prompts; concurrency 1.
(c) the escalation path (null student, every answer escalated to the loopback fault
    server teacher, a new prompt each time) vs posting to the fault server directly; concurrency 1.
(d) micro-batching: the tiny-model router with max_batch 4 vs 1 at concurrency 4, distinct
    prompts; throughput over alternating blocks of requests (arms cannot share a pool here:
    each must see 4 concurrent clients).
(e) the capture proxy (`distill serve --teacher-only`): a multi-turn request through the proxy
    (teacher service, capture log written per request) vs the same body posted to the fault
    server directly; a new prompt each time (never a cache hit); concurrency 1.
Writes bench/results/router.json (bench/harness.py: envelope with load average, affinity and
versions; figures). --quick: 20 requests per arm for (b) and (c), 4 for (a) and (d).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402
from support.fault_server import FaultServer  # noqa: E402

MODEL = "distill-student"
# Both arms of (a) use one intra-op thread: on 2 busy cores torch's default (2) spends more time
# contending than computing (measured here: ~700 ms vs ~30 ms per 6-token answer).
TORCH_THREADS = 1
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Classify: the parcel arrived broken."}],
    "max_tokens": 6,
}


# ---------------------------------------------------------------- servers (child processes)


class NullStudent:
    """Answers instantly: what is left to time is the router itself."""

    ready = True

    async def complete(self, messages, max_tokens):
        from pipeline.llm.completion import Completion

        return Completion(
            text="damaged", source="student", prompt_tokens=12, completion_tokens=1, token_logprobs=[-0.1]
        )


def _app(kind: str, arg: str | None):
    from pipeline.llm.policy import Policy
    from pipeline.router.app import create_app
    from pipeline.router.settings import ServeSettings

    if kind == "bare":
        from fastapi import FastAPI

        app = FastAPI()
        reply = {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "damaged"},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
        }

        @app.post("/v1/chat/completions")
        async def chat(body: dict) -> dict:
            return reply

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok"}

        return app
    if kind == "null":
        return create_app(ServeSettings(max_tokens=8, max_queue=1024), {MODEL: NullStudent()}, Policy.student_only())
    if kind == "tiny":
        import torch

        from pipeline.router.backends import StudentBackend

        torch.set_num_threads(TORCH_THREADS)
        folder, _, max_batch = arg.partition("|")
        student = StudentBackend(Path(folder), max_batch=int(max_batch or 1))
        return create_app(ServeSettings(max_tokens=8), {MODEL: student}, Policy.student_only())
    if kind == "escalate":
        from pipeline.config import TeacherConfig
        from pipeline.router.backends import TeacherBackend
        from pipeline.task import Task

        task = Task(name="bench", instructions="Classify.", labels=["damaged", "late"])
        cfg = TeacherConfig(spec="openai:fault", base_url=arg, allow_unpriced=True, max_retries=0, logprobs=False)
        teacher = TeacherBackend(cfg, task, ":memory:")  # each request sends a new prompt: never a cache hit
        return create_app(ServeSettings(max_tokens=8), {MODEL: NullStudent()}, Policy(threshold=0.0), teacher=teacher)
    if kind == "proxy":
        import tempfile

        from pipeline.config import TeacherConfig
        from pipeline.router.proxy import ProxyTeacher, create_proxy_app
        from pipeline.router.record_log import RecordLog

        work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
        cfg = TeacherConfig(spec="openai:fault", base_url=arg, allow_unpriced=True, max_retries=0, logprobs=False)
        teacher = ProxyTeacher(cfg, work / "cache.sqlite", ledger_path=work / "ledger.json")
        return create_proxy_app(ServeSettings(max_tokens=8), teacher, RecordLog(work / "proxy.jsonl"))
    raise ValueError(kind)


def _serve(kind: str, arg: str | None, port: int) -> None:
    import logging

    import uvicorn

    logging.disable(logging.WARNING)
    uvicorn.run(_app(kind, arg), host="127.0.0.1", port=port, log_level="error", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, kind: str, arg: str | None = None):
        self.port = free_port()
        self.proc = mp.get_context("spawn").Process(target=_serve, args=(kind, arg, self.port), daemon=True)

    def __enter__(self) -> str:
        self.proc.start()
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.1)
        raise SystemExit(f"server {self.proc} did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.join(10)


# ---------------------------------------------------------------- timing


def summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 3),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 3),
    }


def interleaved(arms: dict, n: int, concurrency: int) -> dict[str, list[float]]:
    """`arms`: name -> callable(http client) doing one request. Each worker alternates arms."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    per_worker = max(n // concurrency, 1)

    def worker(w: int) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(per_worker):
                order = list(arms) if (i + w) % 2 == 0 else list(reversed(arms))
                for name in order:
                    started = time.perf_counter()
                    arms[name](http)
                    times[name].append((time.perf_counter() - started) * 1000)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return times


def post(url: str):
    def one(http: httpx.Client) -> None:
        response = http.post(f"{url}/v1/chat/completions", json=BODY)
        response.raise_for_status()

    return one


def compare(times: dict[str, list[float]], arm: str, baseline: str) -> dict:
    out = {name: summary(ms) for name, ms in times.items()}
    out["added_p50_ms"] = round(out[arm]["p50_ms"] - out[baseline]["p50_ms"], 3)
    out["added_p99_ms"] = round(out[arm]["p99_ms"] - out[baseline]["p99_ms"], 3)
    out["median_ratio"] = round(out[arm]["p50_ms"] / out[baseline]["p50_ms"], 3)
    return out


# ---------------------------------------------------------------- the arms


def bench_layer(n: int) -> dict:
    with Server("null") as router, Server("bare") as bare:
        arms = {"router_null_backend": post(router), "bare_uvicorn": post(bare)}
        interleaved(arms, 20, 1)  # warm-up: imports, first connections
        return {
            f"concurrency_{c}": compare(interleaved(arms, n, c), "router_null_backend", "bare_uvicorn") for c in (1, 4)
        }


def tiny_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.llm.loading import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bench_model(n: int, work: Path) -> dict:
    import torch

    from pipeline.llm.generate import generate_batch
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    folder = tiny_model(work / "tiny")
    torch.set_num_threads(TORCH_THREADS)
    model, tokenizer = load_model(str(folder), device_plan()), load_tokenizer(str(folder))

    def in_process(_: httpx.Client) -> None:
        generate_batch(model, tokenizer, [BODY["messages"]], BODY["max_tokens"])

    with Server("tiny", f"{folder}|1") as router:
        arms = {"router_http": post(router), "generate_in_process": in_process}
        interleaved(arms, 4, 1)
        return {"concurrency_1": compare(interleaved(arms, n, 1), "router_http", "generate_in_process")}


def bench_batching(n: int, work: Path, rounds: int = 4, concurrency: int = 4) -> dict:
    folder = work / "tiny"  # written by bench_model when it ran
    if not folder.exists():
        tiny_model(folder)
    counter = iter(range(10**9))
    per_worker = max(n // (rounds * concurrency), 1)

    def block(url: str) -> float:
        def worker(_: int) -> None:
            with httpx.Client(timeout=120) as http:
                for _ in range(per_worker):
                    body = {**BODY, "messages": [{"role": "user", "content": f"message number {next(counter)}"}]}
                    http.post(f"{url}/v1/chat/completions", json=body).raise_for_status()

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(worker, range(concurrency)))
        return time.perf_counter() - started

    with Server("tiny", f"{folder}|4") as batched, Server("tiny", f"{folder}|1") as single:
        block(batched), block(single)  # warm-up
        seconds = {"max_batch_4": 0.0, "max_batch_1": 0.0}
        for _ in range(rounds):
            seconds["max_batch_4"] += block(batched)
            seconds["max_batch_1"] += block(single)
    total = rounds * per_worker * concurrency
    rps = {arm: round(total / s, 2) for arm, s in seconds.items()}
    return {
        "concurrency": concurrency,
        "requests_per_arm": total,
        "requests_per_s": rps,
        "speedup": round(rps["max_batch_4"] / rps["max_batch_1"], 3),
    }


def bench_escalation(n: int) -> dict:
    with FaultServer() as teacher:
        counter = iter(range(10**9))

        def direct(http: httpx.Client) -> None:
            # The same raw HTTP client as the router arm: SDK parsing time would not be the router's.
            response = http.post(
                f"{teacher.base_url}/chat/completions",
                json={
                    "model": "fault",
                    "max_tokens": 6,
                    "messages": [
                        {"role": "system", "content": "Classify."},
                        {"role": "user", "content": f"p{next(counter)}"},
                    ],
                },
            )
            response.raise_for_status()

        with Server("escalate", teacher.base_url) as router:

            def escalated(http: httpx.Client) -> None:
                # A distinct prompt each time: a cached answer is not the escalation path.
                body = {**BODY, "messages": [{"role": "user", "content": f"p{next(counter)}"}]}
                response = http.post(f"{router}/v1/chat/completions", json=body)
                response.raise_for_status()
                assert response.headers["x-distill-route"] == "teacher"

            arms = {"router_escalated": escalated, "teacher_direct": direct}
            interleaved(arms, 10, 1)
            return {"concurrency_1": compare(interleaved(arms, n, 1), "router_escalated", "teacher_direct")}


def bench_proxy(n: int) -> dict:
    with FaultServer() as teacher:
        counter = iter(range(10**9))

        def conversation() -> list[dict]:
            return [
                {"role": "system", "content": "You are Acme's support bot."},
                {"role": "user", "content": "My parcel never came."},
                {"role": "assistant", "content": "Sorry! What is the order number?"},
                {"role": "user", "content": f"It is A{next(counter)}."},
            ]

        def direct(http: httpx.Client) -> None:
            body = {"model": "fault", "max_tokens": 6, "messages": conversation()}
            http.post(f"{teacher.base_url}/chat/completions", json=body).raise_for_status()

        with Server("proxy", teacher.base_url) as proxy:

            def proxied(http: httpx.Client) -> None:
                body = {"model": "fault", "max_tokens": 6, "messages": conversation()}
                http.post(f"{proxy}/v1/chat/completions", json=body).raise_for_status()

            arms = {"proxy": proxied, "teacher_direct": direct}
            interleaved(arms, 10, 1)
            return {"concurrency_1": compare(interleaved(arms, n, 1), "proxy", "teacher_direct")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="Requests per arm for (b) and (c) (default 200, quick 20).")
    parser.add_argument(
        "--n-model",
        type=int,
        default=None,
        help="Requests per arm for (a) (seconds each on a busy CPU; default 40, quick 4).",
    )
    parser.add_argument(
        "--arms",
        default="layer,escalation,model,batching,proxy",
        help="which comparisons: layer (b), escalation (c), model (a), batching (d), proxy (e)",
    )
    harness.add_arguments(parser)
    args = parser.parse_args()
    args.n = args.n or (20 if args.quick else 200)
    args.n_model = args.n_model or (4 if args.quick else 40)
    arms = set(args.arms.split(","))
    known = {"layer", "escalation", "model", "batching", "proxy"}
    if arms - known:
        parser.error(f"unknown arms: {sorted(arms - known)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    load_before = os.getloadavg()
    result = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "pinned": False,
            "torch_threads_a": TORCH_THREADS,
            "loadavg_before": [round(v, 2) for v in load_before],
        }
    }
    if "layer" in arms:
        result["b_router_layer"] = bench_layer(args.n)
    if "escalation" in arms:
        result["c_escalation"] = bench_escalation(args.n)
    if "proxy" in arms:
        result["e_proxy"] = bench_proxy(args.n)
    with tempfile.TemporaryDirectory() as work:
        if "model" in arms:
            result["a_router_vs_in_process"] = bench_model(args.n_model, Path(work))
        if "batching" in arms:
            result["d_micro_batching"] = bench_batching(args.n_model * 2, Path(work))
    result["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    result["wall_s"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))
    harness.write("router", result, args)


if __name__ == "__main__":
    main()
