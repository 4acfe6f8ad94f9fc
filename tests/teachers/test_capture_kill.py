"""SIGKILL a real capture process mid-run, rerun it: nothing answered is asked for again.

.venv/bin/pytest tests/teachers/test_capture_kill.py -q
"""

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

from support.capture_helpers import ROOT, fast_retries, write_prompts, write_recipe
from support.fault_server import FaultServer, answer_for

PROMPTS = 60


def cached_prompts(cache_path, by_answer: dict[str, str]) -> set[str]:
    with sqlite3.connect(cache_path) as db:
        texts = [row[0] for row in db.execute("SELECT json_extract(completion, '$.text') FROM answers")]
    return {by_answer[text] for text in texts}


def test_sigkill_mid_capture_then_rerun_asks_nothing_already_answered(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    prompts = [f"question number {i}" for i in range(PROMPTS)]
    by_answer = {answer_for(p): p for p in prompts}
    runs = tmp_path / "runs"
    # Slow answers (0.2 s each, 4 at a time) leave time to kill it half-way; a few 429/500s too.
    with FaultServer(latency_s=0.2, fault_rate=0.1, faults=("429", "500"), retry_after="0.05") as server:
        recipe = write_recipe(tmp_path, fast_retries(server.base_url, concurrency=4))
        cmd = [sys.executable, "-m", "pipeline", "capture", str(recipe), "--runs-dir", str(runs)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while sum(server.successes.values()) < PROMPTS // 4:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "capture made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
        assert sum(server.successes.values()) < PROMPTS, "killed too late to test anything"

        answered = cached_prompts(tmp_path / "cache.sqlite", by_answer)
        assert answered, "no answer was committed before the kill"
        before = Counter(server.requests)
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        asked_again = set(server.requests - before)

    assert not asked_again & answered, "a prompt answered before the kill was asked for again"
    assert asked_again | answered == set(prompts)
    lines = (runs / "cap" / "capture" / "teacher.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # a truncated line would not parse
    assert len(records) == PROMPTS and len({r["id"] for r in records}) == PROMPTS
    assert all(r["messages"][-1]["content"] == answer_for(r["messages"][0]["content"]) for r in records)
