"""A loopback HTTP server speaking the OpenAI chat-completions (and Anthropic Messages) shape,
injecting faults at a configured rate: 429 with Retry-After, 500, responses slower than the
client's timeout, truncated JSON. Used by tests/test_capture*.py; run it by hand with

    python tests/fault_server.py --port 8089 --fault-rate 0.2

It counts, per prompt (the last user message), every request and every successful answer,
which is what "paid for at most once" is checked against.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
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
                 plan: dict[int, str] | None = None, reject_logprobs: bool = False, seed: int = 0):
        self.fault_rate = fault_rate
        self.faults = faults
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.status = status  # answer every request with this error status (auth tests)
        self.plan = plan or {}  # request number (1-based) -> fault, for deterministic tests
        self.reject_logprobs = reject_logprobs
        self.requests: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.bodies: list[dict] = []
        self.faulted: Counter[str] = Counter()
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
            anthropic = self.path.rstrip("/").endswith("/messages")
            payload = _messages_response(body, prompt) if anthropic else _chat_response(body, prompt)
            data = json.dumps(payload).encode()
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


def _content(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _usage(body: dict) -> tuple[int, int]:
    text = "".join(_content(m.get("content", "")) for m in body.get("messages", [])) + str(body.get("system", ""))
    return len(text) // 4 + 1, 3


def _chat_response(body: dict, prompt: str) -> dict:
    prompt_tokens, completion_tokens = _usage(body)
    logprobs = None
    if body.get("logprobs"):
        logprobs = {"content": [{"token": "ans", "logprob": -0.25, "bytes": None, "top_logprobs": []},
                                {"token": "-x", "logprob": -0.75, "bytes": None, "top_logprobs": []}]}
    return {
        "id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_for(prompt)},
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
