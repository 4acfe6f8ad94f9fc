"""SQLite cache of teacher answers keyed by (provider, model, messages, params, sample).

Used by the teacher service (service.py), so by `distill capture RECIPE`, the judge and the
router's teacher backend. Every answer is committed as soon as it arrives (network teachers:
per call; local: per batch), so a crash, Ctrl-C or SIGKILL loses nothing and a rerun pays for
nothing it already has: it is the durable log of every answer bought.

Batch mode (`teacher.mode=batch`, pipeline/teachers/batch.py) keeps its bookkeeping here too,
in the same file and transactions as the answers: each submission is recorded (prompt keys,
reserved cost) before anything is sent, its provider batch and file ids as soon as they are
known, and its results are imported in one transaction with the batch marked imported, so a
crash at any point neither submits the same prompts twice nor imports a result twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.artifacts import sha256_json
from pipeline.llm.completion import Completion


def cache_key(identity: dict, messages: list[dict], sample: int = 0, params: dict | None = None) -> str:
    """Sample 0 keeps the original key, so answers cached before `teacher.n` existed still hit.
    `params`: request parameters sent as given (the proxy's), part of what was asked."""
    key: dict = {"teacher": identity, "messages": messages}
    if sample:
        key["sample"] = sample
    if params:
        key["params"] = params
    return sha256_json(key)


class TeacherCache:
    def __init__(self, path: Path | str):  # a str: ":memory:" too
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, completion TEXT NOT NULL, created REAL DEFAULT (unixepoch('subsec')))"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(answers)")}
        if "provenance" not in columns:  # caches written before batch mode: their answers were sync
            self._db.execute("ALTER TABLE answers ADD COLUMN provenance TEXT")
        self._db.executescript(BATCH_SCHEMA)
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        return {k: Completion.from_json(json.loads(v)) for k, v in self._rows("completion", keys)}

    def costs(self, keys: list[str]) -> dict[str, float]:
        """key -> what that cached answer cost, for the keys present (without loading the answers)."""
        return {k: float(cost or 0.0) for k, cost in self._rows("json_extract(completion, '$.cost_usd')", keys)}

    def _rows(self, column: str, keys: list[str], where: str = "") -> list[tuple[str, Any]]:
        """(key, column) for the keys present, queried in chunks (SQLite caps a statement's parameters).
        The column's Python type is whatever SQLite stored: each caller knows what it asked for."""
        found = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            found += self._db.execute(
                f"SELECT key, {column} FROM answers WHERE {where}key IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
        return found

    def put_many(self, items: dict[str, Completion]) -> None:
        """Only successful answers are cached: a failed call must be retried on the next run."""
        rows = [(k, json.dumps(c.to_json())) for k, c in items.items() if c.error is None]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO answers (key, completion) VALUES (?, ?)", rows)

    def provenance(self, keys: list[str]) -> dict[str, str]:
        """key -> where its answer came from ("batch:<id>"), for the keys answered other than by a sync call."""
        return dict(self._rows("provenance", keys, where="provenance IS NOT NULL AND "))

    # ------------------------------------------------------------ batches

    def add_submission(self, row: BatchRow, keys: list[str]) -> None:
        """Record a submission, and the prompts it covers, before anything is sent."""
        with self._db:
            self._db.execute(
                f"INSERT INTO batches ({_COLUMNS}) VALUES ({','.join('?' * len(_FIELDS))})",
                [getattr(row, f) for f in _FIELDS],
            )
            self._db.executemany(
                "INSERT INTO batch_requests (submission, key) VALUES (?, ?)", [(row.submission, k) for k in keys]
            )

    def update_submission(self, submission: str, **values) -> None:
        sets = ", ".join(f"{name} = ?" for name in values)
        with self._db:
            self._db.execute(
                f"UPDATE batches SET {sets}, updated = ? WHERE submission = ?",
                [*values.values(), time.time(), submission],
            )

    def drop_submission(self, submission: str) -> None:
        """A submission that provably never reached the provider: its prompts are free to submit again."""
        with self._db:
            self._db.execute("DELETE FROM batch_requests WHERE submission = ?", (submission,))
            self._db.execute("DELETE FROM batches WHERE submission = ?", (submission,))

    def submissions(self, teacher: str | None = None, states: tuple[str, ...] | None = None) -> list[BatchRow]:
        query, args = f"SELECT {_COLUMNS} FROM batches WHERE 1", []
        if teacher is not None:
            query, args = query + " AND teacher = ?", [teacher]
        if states is not None:
            query += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        return [BatchRow(*row) for row in self._db.execute(query + " ORDER BY created", args)]

    def submission_keys(self, submission: str, state: str | None = None) -> list[str]:
        query, args = "SELECT key FROM batch_requests WHERE submission = ?", [submission]
        if state is not None:
            query, args = query + " AND state = ?", [*args, state]
        return [k for (k,) in self._db.execute(query + " ORDER BY rowid", args)]

    def import_results(
        self, submission: str, answers: dict[str, Completion], errors: dict[str, str], provenance: str, **values
    ) -> None:
        """A finished batch's results and its new state, in one transaction: a crash half-way
        imports nothing, and the rerun imports it all, once."""
        rows = [(k, json.dumps(c.to_json()), provenance) for k, c in answers.items()]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO answers (key, completion, provenance) VALUES (?, ?, ?)", rows)
            self._db.executemany(
                "UPDATE batch_requests SET state = 'ok' WHERE submission = ? AND key = ?",
                [(submission, k) for k in answers],
            )
            self._db.executemany(
                "UPDATE batch_requests SET state = 'failed', error = ? WHERE submission = ? AND key = ?",
                [(error, submission, k) for k, error in errors.items()],
            )
            self._db.execute(
                "UPDATE batch_requests SET state = 'lost' WHERE submission = ? AND state = 'pending'", (submission,)
            )
            sets = ", ".join(f"{name} = ?" for name in values)
            self._db.execute(
                f"UPDATE batches SET state = 'imported', {sets}, updated = ? WHERE submission = ?",
                [*values.values(), time.time(), submission],
            )

    def failed_requests(self, submission: str) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT key, error FROM batch_requests WHERE submission = ? AND state = 'failed'", (submission,)
        )
        return dict(rows)

    def close(self) -> None:
        self._db.close()


@dataclass
class BatchRow:
    """One submission of prompts as a provider batch. `state`: preparing (recorded, nothing
    sent: the batch input may be uploaded) -> submitting (create request about to go out: the
    provider may have it) -> submitted (batch id known) -> imported (results in the cache)."""

    submission: str  # ours, chosen before anything is sent; also the batch's metadata on OpenAI
    teacher: str  # sha of the teacher identity: a batch answers only for that teacher
    spec: str
    state: str
    requests: int
    reserved_usd: float  # worst case at the batch price, held against teacher.budget_usd until imported
    created: float
    batch_id: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    provider_status: str | None = None
    done: int = 0
    failed: int = 0
    cost_usd: float = 0.0  # at the batch price, from the results' usage
    sync_cost_usd: float = 0.0  # what the same answers would have cost as sync calls
    updated: float | None = None


_FIELDS = [f.name for f in fields(BatchRow)]
_COLUMNS = ", ".join(_FIELDS)
BATCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    submission TEXT PRIMARY KEY, teacher TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
    requests INTEGER NOT NULL, reserved_usd REAL NOT NULL, created REAL NOT NULL, batch_id TEXT,
    input_file_id TEXT, output_file_id TEXT, error_file_id TEXT, provider_status TEXT,
    done INTEGER DEFAULT 0, failed INTEGER DEFAULT 0, cost_usd REAL DEFAULT 0, sync_cost_usd REAL DEFAULT 0,
    updated REAL
);
CREATE TABLE IF NOT EXISTS batch_requests (
    submission TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', error TEXT,
    PRIMARY KEY (submission, key)
);
CREATE INDEX IF NOT EXISTS batch_requests_key ON batch_requests (key);
"""
