"""`logs:<path>`: import answers the user already has; no API calls, no cost.

    distill capture RECIPE teacher.spec=logs:exports/chat.jsonl
    distill capture RECIPE teacher.spec=logs:support.csv teacher.prompt_col=message teacher.label_col=intent
    distill capture RECIPE teacher.spec=logs:PolyAI/banking77 teacher.prompt_col=text teacher.label_col=label

Two shapes, told apart per record:
- OpenAI chat format (stored completions, fine-tuning files): `{"messages": [..., user, assistant]}`.
  The last assistant turn is the answer, the user turn before it the prompt.
- A table (CSV, JSONL, Parquet, or a hub dataset id / dataset folder read with
  `datasets.load_dataset`, its train split) with a prompt column and a label column. A
  `ClassLabel` column (hub datasets store labels as integers) is read as the label's name.

A record with no answer is rejected, not guessed at: the count and the first line numbers
are reported, and only when nothing is left does the import fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DistillError
from pipeline.teachers.sources import read_rows

SHOWN_REJECTS = 5


@dataclass
class LogRecord:
    where: str
    id: str
    prompt: str
    answer: str
    row: dict[str, Any]


@dataclass
class LogImport:
    records: list[LogRecord] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def rejected_summary(self) -> str:
        shown = ", ".join(f"{where} ({why})" for where, why in self.rejected[:SHOWN_REJECTS])
        more = f" and {len(self.rejected) - SHOWN_REJECTS} more" if len(self.rejected) > SHOWN_REJECTS else ""
        return f"{len(self.rejected)} log records rejected with no usable answer: {shown}{more}"


def import_logs(path: Path | str, prompt_col: str, label_col: str, split: str = "train") -> LogImport:
    result = LogImport()
    for n, (where, row) in enumerate(read_rows(path, split), start=1):
        prompt, answer, why = (_from_chat(row) if "messages" in row else _from_columns(row, prompt_col, label_col))
        if why:
            result.rejected.append((where, why))
            continue
        record_id = str(row["id"]) if row.get("id") is not None else f"l{n:06d}"
        result.records.append(LogRecord(where, record_id, prompt, answer, row))
    if not result.records:
        detail = result.rejected_summary() if result.rejected else "it is empty"
        raise DistillError(f"{path}: no usable log records; {detail}")
    return result


def _from_chat(row: dict) -> tuple[str, str, str | None]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "", "", "messages is not a list of turns"
    last = messages[-1]
    if last.get("role") != "assistant" or not _text(last.get("content")):
        return "", "", "does not end in an assistant answer"
    users = [m for m in messages[:-1] if m.get("role") == "user" and _text(m.get("content"))]
    if not users:
        return "", "", "no user turn before the answer"
    return _text(users[-1]["content"]), _text(last["content"]), None


def _from_columns(row: dict, prompt_col: str, label_col: str) -> tuple[str, str, str | None]:
    prompt, answer = _text(row.get(prompt_col)), _text(row.get(label_col))
    if not prompt:
        return "", "", f"no '{prompt_col}'"
    if not answer:
        return "", "", f"no '{label_col}'"
    return prompt, answer, None


def _text(content: Any) -> str:
    """Chat content is a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text").strip()
    if content is None:
        return ""
    return str(content).strip()
