"""SIGTERM (what process managers and `docker stop` send) stops a capture as cleanly as
Ctrl-C: exit 130, the resume hint, every answer bought so far committed (issue 13, item 8).

    .venv/bin/pytest tests/teachers/test_capture_sigterm.py -q
"""

import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from support.capture_helpers import ROOT, fast_retries, write_prompts, write_recipe
from support.fault_server import FaultServer

PROMPTS = 40


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `cmd &` in a shell script


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal, even when the tests run in the background


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["sigint-default", "sigint-ignored"])
def test_sigterm_mid_capture_exits_like_ctrl_c_with_answers_committed(tmp_path, sigint_ignored):
    write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    with FaultServer(latency_s=0.2) as server:
        recipe = write_recipe(tmp_path, fast_retries(server.base_url, concurrency=2))
        cmd = [sys.executable, "-m", "pipeline", "capture", str(recipe), "--runs-dir", str(tmp_path / "runs")]
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_ignore_sigint if sigint_ignored else _default_sigint,
        )
        deadline = time.monotonic() + 120
        while sum(server.successes.values()) < 4:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "capture made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        paid = sum(server.successes.values())
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: rerun the same command to resume" in err
    # Either disposition: the event loop's SIGTERM handler cancels the capture; no KeyboardInterrupt
    # lands inside a task to be logged as "never retrieved".
    assert "Traceback" not in err and "never retrieved" not in err, err[-2000:]
    assert paid < PROMPTS, "stopped too late to test anything"
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        cached = db.execute("SELECT count(*) FROM answers").fetchone()[0]
    assert cached >= paid - 2  # answers still in flight at the signal may be lost, none before
