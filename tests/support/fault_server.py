"""A loopback HTTP server speaking the OpenAI chat-completions (and Anthropic Messages) shape,
injecting faults at a configured rate: 429 with Retry-After, 500, responses slower than the
client's timeout, truncated JSON. Used by tests/teachers/test_capture*.py; run it by hand with

    python tests/support/fault_server.py --port 8089 --fault-rate 0.2

It counts, per prompt (the last user message), every request and every successful answer,
which is what "paid for at most once" is checked against; and, like a real provider's bill,
the usage of every request it generated an answer for (`billed`), whether or not the client
read it (a slow answer the client gave up on, a truncated body). Like OpenAI, it refuses
`max_tokens` and `temperature` for reasoning models (o1, o3, o4-mini, gpt-5).

It also speaks the batch APIs (`teacher.mode=batch`): OpenAI's Files (/v1/files) and Batches
(/v1/batches), and Anthropic's Message Batches (/v1/messages/batches). A batch advances on
status polls, not on the clock (`batch_step` requests per poll; None: all on the first), so a
test is deterministic however slow the machine. Knobs: `batch_fail` (the first N requests of
the first batch fail), `batch_expire_at` (the first batch expires once that fraction is
done), `upload_failures` (the first N uploads answer 500). `batch_log` records every batch
created, which is what "submitted once" is checked against; `batch_answers` counts, per
prompt, the answers batches generated.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "slow", "truncated")


def answer_for(prompt: str) -> str:
    """The deterministic answer for a prompt, so a test can map a cached answer back to it."""
    return "ans-" + hashlib.sha256(prompt.encode()).hexdigest()[:10]


class FaultServer:
    def __init__(
        self,
        fault_rate: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        latency_s: float = 0.0,
        slow_s: float = 2.0,
        retry_after: str = "0.05",
        status: int | None = None,
        plan: dict[int, str] | None = None,
        reject_logprobs: bool = False,
        seed: int = 0,
        response_format: str = "ignore",
        batch_step: int | None = None,
        batch_fail: int = 0,
        batch_expire_at: float | None = None,
        upload_failures: int = 0,
    ):
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
        self.batch_step = batch_step
        # Polls after this many leave a batch where it is (in progress) until the test clears it:
        # a capture killed while polling finds its batch unfinished, whatever the machine's speed.
        self.batch_hold_after: int | None = None
        self.batch_fail = batch_fail
        self.batch_expire_at = batch_expire_at
        self.upload_failures = upload_failures
        self.uploads = 0  # upload attempts, failed ones included
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}  # id -> our state of it
        self.batch_log: list[dict] = []  # every batch created: id, requests, custom_ids
        self.batch_polls: Counter[str] = Counter()
        self.batch_answers: Counter[str] = Counter()
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

        def do_GET(self) -> None:
            routed = _batch_get(server, self.path.split("?")[0])
            if routed is None:
                return self._error(404, f"no route {self.path}")
            status, data, kind = routed
            self._send(status, data, content_type=kind)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            routed = _batch_post(server, self.path.split("?")[0], raw, self.headers.get("Content-Type", ""))
            if routed is not None:
                status, data, _ = routed
                return self._send(status, data)
            body = json.loads(raw or b"{}")
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

        def _send(
            self, status: int, data: bytes, headers: dict | None = None, content_type: str = "application/json"
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
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
        logprobs = {
            "content": [
                {"token": "ans", "logprob": -0.25, "bytes": None, "top_logprobs": []},
                {"token": "-x", "logprob": -0.75, "bytes": None, "top_logprobs": []},
            ]
        }
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": logprobs,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _messages_response(body: dict, prompt: str) -> dict:
    prompt_tokens, completion_tokens = _usage(body)
    return {
        "id": "msg_fault",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [{"type": "text", "text": answer_for(prompt)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
    }


# ---------------------------------------------------------------- batch APIs

JSON, BINARY = "application/json", "application/octet-stream"


def _json(status: int, payload) -> tuple[int, bytes, str]:
    return status, json.dumps(payload).encode(), JSON


def _batch_post(server: FaultServer, path: str, raw: bytes, content_type: str):
    """Batch-API POSTs, or None for a chat/messages call."""
    parts = path.rstrip("/").split("/")
    if path.endswith("/v1/files"):
        return _upload(server, raw, content_type)
    if path.endswith("/v1/batches") or path.endswith("/v1/messages/batches"):
        anthropic = "messages" in parts
        return _create_batch(server, json.loads(raw or b"{}"), anthropic)
    if parts[-1] == "cancel" and "batches" in parts:
        return _cancel(server, parts[-2])
    return None


def _batch_get(server: FaultServer, path: str):
    parts = path.rstrip("/").split("/")
    if parts[-1] == "batches":
        anthropic = "messages" in parts
        with server._lock:
            data = [_batch_json(server, b) for b in server.batches.values() if b["anthropic"] == anthropic]
        data.reverse()  # newest first, as both providers list them
        return _json(
            200,
            {
                "object": "list",
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            },
        )
    if "batches" in parts and parts[-1] in server.batches:
        return _json(200, _poll(server, parts[-1]))
    if parts[-1] == "results" and parts[-2] in server.batches:
        return 200, server.files[server.batches[parts[-2]]["output_file_id"]], BINARY
    if parts[-1] == "content" and parts[-2] in server.files:
        return 200, server.files[parts[-2]], BINARY
    return None


def _upload(server: FaultServer, raw: bytes, content_type: str):
    with server._lock:
        server.uploads += 1
        if server.uploads <= server.upload_failures:
            return _json(500, {"error": {"message": "upload failed", "type": "server_error"}})
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    fields = {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }
    with server._lock:
        file_id = f"file-{len(server.files) + 1}"
        server.files[file_id] = fields["file"]
    return _json(
        200,
        {
            "id": file_id,
            "object": "file",
            "bytes": len(fields["file"]),
            "created_at": int(time.time()),
            "filename": "batch.jsonl",
            "purpose": fields["purpose"].decode(),
            "status": "processed",
        },
    )


def _create_batch(server: FaultServer, body: dict, anthropic: bool):
    if anthropic:
        requests = body["requests"]
    else:
        lines = server.files[body["input_file_id"]].decode().splitlines()
        requests = [json.loads(line) for line in lines if line.strip()]
    with server._lock:
        n = len(server.batch_log)
        batch_id = f"msgbatch_{n + 1:04d}" if anthropic else f"batch_{n + 1:04d}"
        server.batches[batch_id] = {
            "id": batch_id,
            "anthropic": anthropic,
            "requests": requests,
            "done": 0,
            "status": "in_progress",
            "first": n == 0,
            "input_file_id": body.get("input_file_id"),
            "metadata": body.get("metadata"),
            "created_at": time.time(),
            "output_file_id": None,
            "error_file_id": None,
            "cancel": False,
            "counts": {},
        }
        server.batch_log.append(
            {"id": batch_id, "requests": len(requests), "custom_ids": [r["custom_id"] for r in requests]}
        )
        return _json(200, _batch_json(server, server.batches[batch_id]))


def _cancel(server: FaultServer, batch_id: str):
    with server._lock:
        batch = server.batches[batch_id]
        if batch["status"] == "in_progress":
            batch["cancel"], batch["status"] = True, "cancelling"
        return _json(200, _batch_json(server, batch))


def _poll(server: FaultServer, batch_id: str) -> dict:
    """A status retrieve: the batch advances by `batch_step` requests, then maybe ends."""
    with server._lock:
        server.batch_polls[batch_id] += 1
        batch = server.batches[batch_id]
        n = len(batch["requests"])
        held = server.batch_hold_after is not None and server.batch_polls[batch_id] > server.batch_hold_after
        if batch["status"] == "in_progress" and not held:
            batch["done"] = min(n, batch["done"] + (server.batch_step or n))
            expire = server.batch_expire_at if batch["first"] else None
            if expire is not None and batch["done"] >= int(n * expire):
                batch["done"] = int(n * expire)
                _finish(server, batch, "expired")
            elif batch["done"] == n:
                _finish(server, batch, "completed")
        elif batch["status"] == "cancelling":
            _finish(server, batch, "cancelled")
        return _batch_json(server, batch)


def _finish(server: FaultServer, batch: dict, outcome: str) -> None:
    """Generate the answers of the requests that ran, and the result files (lock held)."""
    ok, errors, counts = [], [], Counter()
    for i, request in enumerate(batch["requests"]):
        if i >= batch["done"]:
            counts["expired" if outcome == "expired" else "canceled"] += 1
            errors.append(_not_run(request, outcome, batch["anthropic"]))
        elif batch["first"] and i < server.batch_fail:
            counts["errored"] += 1
            errors.append(_failed(request, batch["anthropic"]))
        else:
            counts["succeeded"] += 1
            ok.append(_answered(server, request, batch["anthropic"]))
    batch["counts"] = counts
    batch["status"] = outcome
    if batch["anthropic"]:
        batch["output_file_id"] = _store(server, ok + errors)
    else:
        batch["output_file_id"] = _store(server, ok) if ok else None
        batch["error_file_id"] = _store(server, errors) if errors else None


def _store(server: FaultServer, lines: list[dict]) -> str:
    file_id = f"file-{len(server.files) + 1}"
    server.files[file_id] = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return file_id


def _answered(server: FaultServer, request: dict, anthropic: bool) -> dict:
    body = request["params"] if anthropic else request["body"]
    turns = [m for m in body.get("messages", []) if m.get("role") == "user"]
    prompt = _content(turns[-1]["content"]) if turns else ""
    server.billed.append(_usage(body))
    server.batch_answers[prompt] += 1
    if anthropic:
        return {
            "custom_id": request["custom_id"],
            "result": {"type": "succeeded", "message": _messages_response(body, prompt)},
        }
    response = _chat_response(body, prompt, server.response_format == "follow")
    return {
        "id": f"batch_req_{request['custom_id'][:8]}",
        "custom_id": request["custom_id"],
        "response": {"status_code": 200, "request_id": "req_fault", "body": response},
        "error": None,
    }


def _failed(request: dict, anthropic: bool) -> dict:
    if anthropic:
        return {
            "custom_id": request["custom_id"],
            "result": {
                "type": "errored",
                "error": {"type": "error", "error": {"type": "api_error", "message": "internal error"}},
            },
        }
    return {
        "id": "batch_req_failed",
        "custom_id": request["custom_id"],
        "error": None,
        "response": {
            "status_code": 500,
            "request_id": "req_fault",
            "body": {"error": {"message": "internal error", "type": "server_error"}},
        },
    }


def _not_run(request: dict, outcome: str, anthropic: bool) -> dict:
    if anthropic:
        return {
            "custom_id": request["custom_id"],
            "result": {"type": "expired" if outcome == "expired" else "canceled"},
        }
    code = "batch_expired" if outcome == "expired" else "batch_cancelled"
    return {
        "id": "batch_req_not_run",
        "custom_id": request["custom_id"],
        "response": None,
        "error": {"code": code, "message": f"This request was not run: the batch {outcome}."},
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _batch_json(server: FaultServer, batch: dict) -> dict:
    n, done, status = len(batch["requests"]), batch["done"], batch["status"]
    ended = status in ("completed", "expired", "cancelled")
    if batch["anthropic"]:
        c = batch["counts"]
        counts = {
            "processing": 0 if ended else n,
            "succeeded": c.get("succeeded", 0),
            "errored": c.get("errored", 0),
            "canceled": c.get("canceled", 0),
            "expired": c.get("expired", 0),
        }
        return {
            "id": batch["id"],
            "type": "message_batch",
            "processing_status": "ended" if ended else ("canceling" if status == "cancelling" else "in_progress"),
            "request_counts": counts,
            "created_at": _iso(batch["created_at"]),
            "expires_at": _iso(batch["created_at"] + 86400),
            "ended_at": _iso(time.time()) if ended else None,
            "archived_at": None,
            "cancel_initiated_at": _iso(batch["created_at"]) if batch["cancel"] else None,
            "results_url": (
                f"http://127.0.0.1:{server.port}/v1/messages/batches/{batch['id']}/results" if ended else None
            ),
        }
    failed = batch["counts"].get("errored", 0) if ended else min(done, server.batch_fail if batch["first"] else 0)
    return {
        "id": batch["id"],
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": batch["input_file_id"],
        "completion_window": "24h",
        "status": status,
        "output_file_id": batch["output_file_id"],
        "error_file_id": batch["error_file_id"],
        "created_at": int(batch["created_at"]),
        "metadata": batch["metadata"],
        "request_counts": {"total": n, "completed": done - failed, "failed": failed},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--batch-step", type=int, default=None, help="batch requests finished per status poll")
    parser.add_argument("--batch-fail", type=int, default=0, help="first N requests of the first batch fail")
    parser.add_argument("--follow-schema", action="store_true", help="answer a response_format label enum")
    args = parser.parse_args()
    server = FaultServer(
        fault_rate=args.fault_rate,
        latency_s=args.latency_s,
        batch_step=args.batch_step,
        batch_fail=args.batch_fail,
        response_format="follow" if args.follow_schema else "ignore",
    ).start(args.port)
    print(f"serving on {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
