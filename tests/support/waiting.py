"""Waiting on events, not on wall-clock windows: poll a condition until it holds. The timeout only
bounds a hang (a loaded 2-core machine is slow, never wrong), and the failure names the event."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 120.0, poll_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout_s:g} s: {what}")
        time.sleep(poll_s)
