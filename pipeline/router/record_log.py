"""The append-only JSONL logs a server writes: the escalation log and the proxy's capture log.

    distill serve RECIPE                       (.distill/escalations.jsonl; serve.escalations)
    distill serve RECIPE --teacher-only        (.distill/proxy.jsonl; serve.proxy_log)

What they hold becomes training data and what clients wrote, so the log is built not to lose,
corrupt or leak a record:

- One record per line, written by a single write() on an O_APPEND descriptor: a reader (or a
  crash) sees whole lines, or at worst a torn last one.
- A torn last line (the process died mid-write) is dealt with when the log is opened: completed
  with its newline when it is a whole record, else cut off, logged and counted (`torn`). The
  next record is never glued onto it, so the file always reads.
- Created 0600 (owner only), and an existing file is narrowed to 0600 when opened.
- Rotated past `rotate_bytes` to `<stem>-<UTC time>.jsonl` beside it (with -2, -3... if that name
  is taken), moved by a hard link that fails rather than replace: an older rotation is never
  overwritten, and the rotated name still ends in .jsonl, so `logs:` reads it.
- With `scrub_pii` (serve.scrub_pii, on by default), every text in the record except its
  identifiers goes through curate's scrubber (pipeline/pii.py: e-mails, cards, IBANs,
  phone numbers, API keys) before a byte is written.
- A write that fails (disk full, a read-only disk) is undone (the file cut back to where it
  was), logged and counted (`failed`): `append` returns False and never raises, so the answer
  the record is about, already paid for, still reaches its client.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.pii import scrub

log = logging.getLogger(__name__)

ROTATE_BYTES = 64 * 1024 * 1024
MODE = 0o600
# Identifiers and hashes: not text anyone wrote, and scrubbing could only break them.
NOT_SCRUBBED = frozenset(
    {"id", "prompt_sha", "policy", "teacher", "teacher_source", "source", "model_version", "created_at"}
)


class RecordLog:
    """Append-only JSONL, one record per `append`; safe from several threads of one process."""

    def __init__(self, path: Path, rotate_bytes: int = ROTATE_BYTES, scrub_pii: bool = True):
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.scrub_pii = scrub_pii
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.written = 0
        self.failed = 0
        self.rotated: list[Path] = []
        self.scrubbed: Counter = Counter()  # replacements per kind of personal data
        self.torn = self._repair()
        self._narrow_mode()

    def append(self, record: dict[str, Any]) -> bool:
        """Write one record; False (logged and counted) when it could not be written."""
        if self.scrub_pii:
            record = self._scrubbed(record)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            try:
                self._maybe_rotate()
                self._write(line)
            except OSError as err:
                self.failed += 1
                log.error(
                    "cannot append to %s (%s): record %s not logged", self.path, err.strerror or err, record.get("id")
                )
                return False
            self.written += 1
        return True

    # ------------------------------------------------------------ writing

    def _write(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, MODE)
        try:
            before = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(line):
                    done += os.write(fd, line[done:])
            except OSError:
                _cut_back(fd, before)  # no half record left for the next one to glue onto
                raise
        finally:
            os.close(fd)

    def _maybe_rotate(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.rotate_bytes or not self.path.is_file():
            return
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        for n in range(1, 1000):
            target = self.path.with_name(f"{self.path.stem}-{stamp}{'' if n == 1 else f'-{n}'}{self.path.suffix}")
            try:
                os.link(self.path, target)  # fails on an existing name: nothing is ever replaced
            except FileExistsError:
                continue
            os.unlink(self.path)
            self.rotated.append(target)
            log.info("rotated %s to %s", self.path, target.name)
            return
        raise OSError(f"no free rotation name beside {self.path}")

    def _scrubbed(self, record: dict[str, Any]) -> dict[str, Any]:
        counts: Counter = Counter()
        clean = _scrub_value(record, counts)
        self.scrubbed.update(counts)
        return clean

    # ------------------------------------------------------------ opening

    def _repair(self) -> int:
        """1 when the file ended in a torn line (completed or cut off), else 0."""
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return 0
            with open(self.path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return 0
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return 0
                start = _last_line_start(f, size)
                f.seek(start)
                tail = f.read()
                if _whole_record(tail):
                    f.seek(size)
                    f.write(b"\n")
                    log.warning(
                        "%s: its last record had no newline (the server stopped mid-write); completed it", self.path
                    )
                else:
                    f.truncate(start)
                    log.warning(
                        "%s: cut off a torn last line of %d bytes (the server stopped mid-write); the "
                        "records before it are whole",
                        self.path,
                        size - start,
                    )
            return 1
        except FileNotFoundError:
            return 0

    def _narrow_mode(self) -> None:
        try:
            if stat.S_ISREG(os.stat(self.path).st_mode):
                os.chmod(self.path, MODE)
        except FileNotFoundError:
            pass


def _scrub_value(value: Any, counts: Counter, key: str | None = None) -> Any:
    if isinstance(value, str):
        return value if key in NOT_SCRUBBED else scrub(value, counts)
    if isinstance(value, dict):
        return {k: _scrub_value(v, counts, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(v, counts, key) for v in value]
    return value


def _last_line_start(f, size: int, chunk: int = 1 << 16) -> int:
    """Offset just past the last newline before `size` (0 when there is none)."""
    end = size
    while end > 0:
        start = max(end - chunk, 0)
        f.seek(start)
        found = f.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _whole_record(tail: bytes) -> bool:
    try:
        return isinstance(json.loads(tail), dict)
    except ValueError:
        return False


def _cut_back(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # not a regular file, or the disk refuses that too: the open at next start repairs it
