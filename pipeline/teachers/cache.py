"""SQLite cache of teacher answers keyed by (provider, model, messages, params, sample).

Used by the teacher service (service.py), so by `distill capture RECIPE`, the judge and the
router's teacher backend. Every answer is committed as soon as it arrives (network teachers:
per call; local: per batch), so a crash, Ctrl-C or SIGKILL loses nothing and a rerun pays for
nothing it already has: it is the durable log of every answer bought.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from pipeline.artifacts import sha256_json
from pipeline.llm.completion import Completion


def cache_key(identity: dict, messages: list[dict], sample: int = 0) -> str:
    """Sample 0 keeps the original key, so answers cached before `teacher.n` existed still hit."""
    if sample == 0:
        return sha256_json({"teacher": identity, "messages": messages})
    return sha256_json({"teacher": identity, "messages": messages, "sample": sample})


class TeacherCache:
    def __init__(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, completion TEXT NOT NULL, created REAL DEFAULT (unixepoch('subsec')))"
        )
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        found = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = self._db.execute(
                f"SELECT key, completion FROM answers WHERE key IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update({k: Completion.from_json(json.loads(v)) for k, v in rows})
        return found

    def costs(self, keys: list[str]) -> dict[str, float]:
        """key -> what that cached answer cost, for the keys present (without loading the answers)."""
        found: dict[str, float] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = self._db.execute(
                f"SELECT key, json_extract(completion, '$.cost_usd') FROM answers WHERE key IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            found.update({k: float(cost or 0.0) for k, cost in rows})
        return found

    def put_many(self, items: dict[str, Completion]) -> None:
        """Only successful answers are cached: a failed call must be retried on the next run."""
        rows = [(k, json.dumps(c.to_json())) for k, c in items.items() if c.error is None]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO answers (key, completion) VALUES (?, ?)", rows)

    def close(self) -> None:
        self._db.close()
