"""A loopback HTTP server speaking the OpenAI chat-completions (and Anthropic Messages) shape,
injecting faults at a configured rate: 429 with Retry-After, 500, responses slower than the
client's timeout, truncated JSON. Used by tests/test_capture*.py; run it by hand with

    python tests/fault_server.py --port 8089 --fault-rate 0.2

It counts, per prompt (the last user message), every request and every successful answer,
which is what "paid for at most once" is checked against; and, like a real provider's bill,
the usage of every request it generated an answer for (`billed`), whether or not the client
read it (a slow answer the client gave up on, a truncated body). Like OpenAI, it refuses
`max_tokens` and `temperature` for reasoning models (o1, o3, o4-mini, gpt-5).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "slow", "truncated")


def answer_for(prompt: str) -> str:
    """The deterministic answer for a prompt, so a test can map a cached answer back to it."""
    return "ans-" + hashlib.sha256(prompt.encode()).hexdigest()[:10]


class FaultServer:
    def __init__(self, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS, latency_s: float = 0.0,
                 slow_s: float = 2.0, retry_after: str = "0.05", status: int | None = None,
                 plan: dict[int, str] | None = None, reject_logprobs: bool = False, seed: int = 0,
                 response_format: str = "ignore"):
        self.fault_rate = fault_rate
        self.faults = faults
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.status = status  # answer every request with this error status (auth tests)
        self.plan = plan or {}  # request number (1-based) -> fault, for deterministic tests
        self.reject_logprobs = reject_logprobs
        # What it does with a `response_format` JSON schema: "ignore" it (answer as usual),
        # "follow" it (answer {"label": one of the enum}, as llama.cpp, vLLM and OpenAI do), or "reject" (400).
        self.response_format = response_format
        self.requests: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.bodies: list[dict] = []
        self.faulted: Counter[str] = Counter()
        self.billed: list[tuple[int, int]] = []  # (prompt_tokens, completion_tokens) per generation
        self.total = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, port: int = 0) -> FaultServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ decisions

    def admit(self, prompt: str) -> str | None:
        """Count the request and pick its fault (None: answer normally)."""
        with self._lock:
            self.total += 1
            self.requests[prompt] += 1
            self.times[prompt].append(time.monotonic())
            fault = self.plan.get(self.total)
            if fault is None and self.fault_rate and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.faults)
            if fault:
                self.faulted[fault] += 1
            return fault

    def bill(self, usage: tuple[int, int]) -> None:
        with self._lock:
            self.billed.append(usage)

    def billed_usd(self, input_per_mtok: float, output_per_mtok: float) -> float:
        with self._lock:
            return sum(p * input_per_mtok + c * output_per_mtok for p, c in self.billed) / 1e6

    def succeeded(self, prompt: str) -> None:
        with self._lock:
            self.successes[prompt] += 1


def _handler(server: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            return

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with server._lock:
                server.bodies.append(body)
            turns = [m for m in body.get("messages", []) if m.get("role") == "user"]
            prompt = _content(turns[-1]["content"]) if turns else ""
            fault = server.admit(prompt)
            if server.status is not None:
                return self._error(server.status, "Incorrect API key provided: sk-test-abcdefghijklmnop")
            if server.latency_s:
                time.sleep(server.latency_s)
            if fault == "429":
                return self._error(429, "rate limited", {"Retry-After": server.retry_after})
            if fault == "500":
                return self._error(500, "internal error")
            if server.reject_logprobs and body.get("logprobs"):
                return self._error(400, "logprobs are not supported")
            if server.response_format == "reject" and "response_format" in body:
                return self._error(400, "response_format is not supported")
            refused = _refused_for_reasoning(body)
            if refused:
                return self._error(400, f"Unsupported parameter: '{refused}' is not supported with this model.")
            anthropic = self.path.rstrip("/").endswith("/messages")
            follow = server.response_format == "follow"
            payload = _messages_response(body, prompt) if anthropic else _chat_response(body, prompt, follow)
            data = json.dumps(payload).encode()
            server.bill(_usage(body))  # generated: billed, whatever happens to the bytes now
            if fault == "slow":
                time.sleep(server.slow_s)
            if fault == "truncated":
                data = data[: len(data) // 2]
            try:
                self._send(200, data)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client gave up (timed out): nothing was delivered
            if fault is None:
                server.succeeded(prompt)

        def _error(self, status: int, message: str, headers: dict | None = None) -> None:
            data = json.dumps({"error": {"message": message, "type": "error", "code": status}}).encode()
            self._send(status, data, headers)

        def _send(self, status: int, data: bytes, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

    return Handler


REASONING = re.compile(r"^(o\d+|gpt-5)([-.].*)?$")


def _refused_for_reasoning(body: dict) -> str | None:
    if not REASONING.match(str(body.get("model", ""))):
        return None
    return next((k for k in ("max_tokens", "temperature", "logprobs") if k in body), None)


def _content(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _usage(body: dict) -> tuple[int, int]:
    text = "".join(_content(m.get("content", "")) for m in body.get("messages", [])) + str(body.get("system", ""))
    return len(text) // 4 + 1, 3


def _structured_answer(body: dict, prompt: str) -> str | None:
    """{"label": ...} picked from the schema's enum by the prompt's hash; None without a schema."""
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
    labels = ((schema.get("properties") or {}).get("label") or {}).get("enum")
    if not labels:
        return None
    return json.dumps({"label": labels[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(labels)]})


def _chat_response(body: dict, prompt: str, follow_schema: bool = False) -> dict:
    prompt_tokens, completion_tokens = _usage(body)
    content = (_structured_answer(body, prompt) if follow_schema else None) or answer_for(prompt)
    logprobs = None
    if body.get("logprobs"):
        logprobs = {"content": [{"token": "ans", "logprob": -0.25, "bytes": None, "top_logprobs": []},
                                {"token": "-x", "logprob": -0.75, "bytes": None, "top_logprobs": []}]}
    return {
        "id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": logprobs}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _messages_response(body: dict, prompt: str) -> dict:
    prompt_tokens, completion_tokens = _usage(body)
    return {
        "id": "msg_fault", "type": "message", "role": "assistant", "model": body.get("model"),
        "content": [{"type": "text", "text": answer_for(prompt)}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--latency-s", type=float, default=0.0)
    args = parser.parse_args()
    server = FaultServer(fault_rate=args.fault_rate, latency_s=args.latency_s).start(args.port)
    print(f"serving on {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
