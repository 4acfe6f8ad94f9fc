"""Shared by the router tests and the end-to-end tests that serve: a loopback uvicorn, the openai
client pointed at it, the fault server as a teacher backend, and a fixed confident student."""

from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager

import openai

from pipeline.config import TeacherConfig
from pipeline.task import Task, WorkedExample

MODEL = "distill-student"
MESSAGES = [{"role": "user", "content": "Classify: the parcel arrived broken."}]
TASK = Task(
    name="support",
    instructions="Classify the customer message.",
    labels=["damaged", "late"],
    examples=[WorkedExample(prompt="the box was crushed", label="damaged")],
)


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a loopback port chosen by the OS; stop it on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # we hold the socket, so no other process can take the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def teacher_for(server, **overrides):
    """A teacher backend asking `server` (anything with a `base_url`, e.g. a FaultServer)."""
    from pipeline.router.backends import TeacherBackend

    fields = dict(
        spec="openai:fault-teacher",
        base_url=server.base_url,
        allow_unpriced=True,
        max_retries=0,
        timeout_s=5,
        backoff_initial_s=0.01,
        logprobs=False,
    )
    cfg = TeacherConfig(**{**fields, **overrides})
    return TeacherBackend(cfg, TASK, ":memory:")


def app_for(student, policy, teacher=None, escalations=None, **settings):
    from pipeline.router.app import create_app
    from pipeline.router.escalations import EscalationLog
    from pipeline.router.modes import Mode
    from pipeline.router.settings import ServeSettings

    mode = Mode.parse(settings.pop("mode", "live"))
    log = EscalationLog(escalations) if escalations is not None else None
    return create_app(
        ServeSettings(max_tokens=8, mode=mode, **settings), {MODEL: student}, policy, teacher=teacher, escalations=log
    )


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class FixedStudent:
    """A confident student that always says the same label and stops by itself."""

    ready = True

    async def complete(self, messages, max_tokens):
        from pipeline.llm.completion import Completion

        return Completion(
            text="damaged", source="student", prompt_tokens=9, completion_tokens=1, token_logprobs=[-0.01]
        )
