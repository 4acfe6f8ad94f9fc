"""uvicorn as `distill serve` runs it: connection and read deadlines a slow client cannot outlast.

    distill serve RECIPE serve.header_timeout_s=10 serve.body_timeout_s=30 serve.max_connections=512

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and open connections
(`limit_concurrency`: past it a request gets 503), but not a request head that never finishes:
a client that connects and sends half a header line holds its connection forever. HeadDeadline
closes a connection whose request head has not arrived `header_timeout_s` after it connected
or after its last answer. The body's own deadline is the BodyLimit middleware's (guards.py:
408), so every phase of a request is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.errors import DistillError

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from pipeline.router.settings import ServeSettings


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is late (subclassed per
    server by `protocol_class` with its deadline)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm()  # bytes of a next request: its head is now on the clock
        super().data_received(data)
        if not self._between_requests():
            self._disarm()  # the head is in: from here the body deadline (guards.py) and the app's apply

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late, self.cycle)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self, cycle_when_armed) -> None:
        self._head_timer = None
        # The same cycle as when armed and still between requests: no request head arrived since.
        if self.cycle is cycle_when_armed and self._between_requests() and not self.transport.is_closing():
            self.transport.close()


def protocol_class(header_timeout_s: float) -> type[HeadDeadline]:
    return type("HeadDeadlineProtocol", (HeadDeadline,), {"header_timeout_s": header_timeout_s})


def uvicorn_config(
    app: FastAPI, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> uvicorn.Config:
    """The uvicorn configuration `distill serve` and the tests run the app with."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol_class(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_s,
    )


def run(app: FastAPI, settings: ServeSettings, host: str, port: int) -> None:
    """Serve until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, settings, host, port)).run()


@contextmanager
def serving_in_background(app: FastAPI, settings: ServeSettings) -> Iterator[str]:
    """The app under uvicorn on a loopback port the OS picks, in a background thread: a client in
    this process (`distill loop-sim`) talks to it over real HTTP. Yields the base URL once the
    server is accepting; stops it on exit."""
    import uvicorn

    started = threading.Event()

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            started.set()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # held by us from here: no other process can take the port
    server = Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not started.wait(0.1):
            if not thread.is_alive():
                raise DistillError("the router exited before it was ready (its log says why)")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
