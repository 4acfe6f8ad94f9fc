"""`logs:<path>`: import answers the user already has; no API calls, no cost.

    distill capture RECIPE teacher.spec=logs:exports/chat.jsonl
    distill capture RECIPE teacher.spec=logs:batch_input.jsonl+batch_output.jsonl
    distill capture RECIPE teacher.spec=logs:support.csv teacher.prompt_col=message teacher.label_col=intent
    distill capture RECIPE teacher.spec=logs:PolyAI/banking77 teacher.prompt_col=text teacher.label_col=label

Every record keeps the whole conversation as it was sent (system or developer, user and earlier
assistant turns) and the final assistant turn as the answer. Shapes, told apart per record:

- OpenAI chat format (chat logs, stored completions, fine-tuning files, Distill's own capture
  records and escalation logs): `{"messages": [..., user, assistant]}`. Text content parts are
  joined; the request parameters that change the answer (`response_format`, `max_tokens`, ...)
  are kept from the row (or its `meta.request`) in the record's `meta.request`.
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}` (role/content
  turns under `conversations` read too).
- An OpenAI Batch API pair, `logs:<input>.jsonl+<output>.jsonl` in either order: the input file's
  requests (`custom_id`, `body.messages`) joined with the output file's answers by `custom_id`.
- A table (CSV, JSONL, Parquet, or a hub dataset id / dataset folder read with `datasets`, its
  train split) with a prompt column and a label column; a `ClassLabel` column (hub datasets
  store labels as integers) is read as the label's name. A dataset with a `messages` column is
  read as chat records.

A record that cannot be used is rejected, not guessed at: each is counted with its line and
reason; conversations with tool calls, images, audio or files are counted per kind ("skipped 3
records: tool calls are not supported"). Only when nothing is left does the import fail.

`LogsTeacher` answers live from the same records, a simulation device (a labelled dataset standing
in for a paid teacher in serving and in the loop, `distill loop-sim`): a conversation it holds,
matched exactly as the teacher is asked it (`sha256_json` of the turns, as capture records'
`prompt_sha` and the teacher cache key it), gets the record's answer; any other gets an error
Completion, so the router falls back to the student as it does when a teacher fails. Its answers
are priced at the API `eval.cost.teacher_priced_as` names, else `teacher.price`, else $0, with
tokens estimated at ~4 characters each (the dataset has no usage); the price's source is in `notes`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import sha256_json
from pipeline.conversation import Unsupported, read_messages, request_params, skipped_lines, split_answer, user_turn
from pipeline.errors import DistillError
from pipeline.llm.completion import Completion
from pipeline.prices import Price
from pipeline.teachers.ledger import prompt_tokens_estimate
from pipeline.teachers.sources import read_rows

if TYPE_CHECKING:
    from pipeline.config import EvalCostConfig, TeacherConfig
    from pipeline.task import Task

SHOWN_REJECTS = 5
BATCH_JOIN = "+"
# ShareGPT speaker names -> chat roles; tool speakers are named so they are counted, not misread.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
SHAREGPT_TOOLS = ("function_call", "function_response", "observation", "tool", "function")


@dataclass
class LogRecord:
    where: str
    id: str
    messages: list[dict[str, str]]  # the conversation before the answer, as it was sent
    answer: str
    request: dict[str, Any]  # meta.request: the sent parameters that change the answer
    row: dict[str, Any]


@dataclass
class LogImport:
    records: list[LogRecord] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (where, why), unsupported content included
    unsupported: Counter = field(default_factory=Counter)  # kind ("tool calls", "images", ...) -> records

    def rejected_summary(self) -> str:
        shown = ", ".join(f"{where} ({why})" for where, why in self.rejected[:SHOWN_REJECTS])
        more = f" and {len(self.rejected) - SHOWN_REJECTS} more" if len(self.rejected) > SHOWN_REJECTS else ""
        return f"{len(self.rejected)} log records rejected: {shown}{more}"


def log_files(ref: str) -> list[Path]:
    """The files a `logs:` spec names: one, or an OpenAI Batch input+output pair."""
    path = Path(ref)
    if BATCH_JOIN in ref and not path.exists():
        return [Path(p) for p in ref.split(BATCH_JOIN)]
    return [path]


def import_logs(path: Path | str, prompt_col: str, label_col: str, split: str = "train") -> LogImport:
    files = log_files(str(path))
    rows = _batch_rows(files) if len(files) > 1 else _plain_rows(path, split)
    result = LogImport()
    for n, (where, row, why) in enumerate(rows, start=1):
        try:
            if why:
                raise ValueError(why)
            messages, answer, request = _read_row(row, prompt_col, label_col)
        except Unsupported as err:
            result.unsupported[err.kind] += 1
            result.rejected.append((where, str(err)))
            continue
        except ValueError as err:
            result.rejected.append((where, str(err)))
            continue
        record_id = str(row["id"]) if row.get("id") is not None else f"l{n:06d}"
        result.records.append(LogRecord(where, record_id, messages, answer, request, row))
    if not result.records:
        detail = (
            "; ".join([result.rejected_summary(), *skipped_lines(result.unsupported)])
            if result.rejected
            else "it holds no records"
        )
        raise DistillError(f"{path}: no usable log records; {detail}")
    return result


def _plain_rows(path: Path | str, split: str) -> Iterator[tuple[str, dict, str | None]]:
    for where, row in read_rows(path, split):
        if "custom_id" in row and ("body" in row or "response" in row):
            raise DistillError(
                f"{where}: an OpenAI Batch API file; import its input and output together: "
                f"teacher.spec=logs:<input>.jsonl{BATCH_JOIN}<output>.jsonl"
            )
        yield where, row, None


def _read_row(row: dict, prompt_col: str, label_col: str) -> tuple[list[dict], str, dict]:
    """(conversation before the answer, answer, request params) of one row, or ValueError / Unsupported."""
    if row.get("messages") is not None:
        turns = row["messages"]
    elif row.get("conversations") is not None:
        turns = _sharegpt(row["conversations"])
    else:
        return _from_columns(row, prompt_col, label_col)
    context, answer = split_answer(read_messages(turns))
    if not answer.strip():
        raise ValueError("the assistant answer is empty")
    meta = row["meta"] if isinstance(row.get("meta"), dict) else {}
    return context, answer, {**request_params(row), **request_params(meta.get("request") or {})}


def _sharegpt(turns: Any) -> list[dict]:
    """ShareGPT turns -> OpenAI turns (role/content turns pass through)."""
    if not isinstance(turns, list):
        raise ValueError("conversations is not a list of turns")
    out = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and "from" in turn:
            speaker = turn["from"]
            if speaker in SHAREGPT_TOOLS:
                raise Unsupported("tool calls")
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(f"turn {i} is from {speaker!r}, not one of {', '.join(SHAREGPT_ROLES)}")
            out.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
        else:
            out.append(turn)
    return out


def _from_columns(row: dict, prompt_col: str, label_col: str) -> tuple[list[dict], str, dict]:
    prompt, answer = _cell(row.get(prompt_col)), _cell(row.get(label_col))
    if not prompt.strip():
        raise ValueError(f"no '{prompt_col}'")
    if not answer.strip():
        raise ValueError(f"no '{label_col}'")
    return user_turn(prompt), answer, {}


def _cell(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


# ---------------------------------------------------------------- OpenAI Batch API pairs


def _batch_rows(files: list[Path]) -> Iterator[tuple[str, dict, str | None]]:
    """Each request of the input file as a chat row (its messages plus the output file's answer,
    joined by custom_id; its body's parameters at the top level), at its input line. A request
    without a usable answer comes with the reason, so it is counted against that line."""
    if len(files) != 2:
        raise DistillError(
            f"{BATCH_JOIN.join(map(str, files))}: a Batch API import names two files, "
            f"<input>.jsonl{BATCH_JOIN}<output>.jsonl"
        )
    for f in files:
        if not f.is_file():
            raise DistillError(f"{f}: file not found")
    first = next(iter(read_rows(files[0])), (None, {}))[1]
    inputs, outputs = files if "body" in first else files[::-1]
    answers = {str(row.get("custom_id")): (where, row) for where, row in read_rows(outputs)}
    for where, request in read_rows(inputs):
        if "body" not in request or "custom_id" not in request:
            raise DistillError(f"{where}: not an OpenAI Batch API request line (want custom_id and body)")
        row, why = _joined(request, answers.get(str(request["custom_id"])))
        yield where, row, why


def _joined(request: dict, answered: tuple[str, dict] | None) -> tuple[dict, str | None]:
    body = request["body"] if isinstance(request["body"], dict) else {}
    row = {"id": request["custom_id"], **request_params(body)}
    if not str(request.get("url", "/v1/chat/completions")).endswith("/chat/completions"):
        return row, f"a {request.get('url')} request, not chat completions"
    if answered is None:
        return row, f"custom_id {request['custom_id']!r} has no line in the output file"
    where, out = answered
    response = out.get("response") or {}
    if out.get("error") or response.get("status_code") != 200:
        why = (out.get("error") or {}).get("message") or f"status {response.get('status_code')}"
        return row, f"the batch request failed ({why}; {where})"
    choices = (response.get("body") or {}).get("choices") or []
    if not choices or not isinstance(choices[0].get("message"), dict):
        return row, f"no answer in {where}"
    return {**row, "messages": [*(body.get("messages") or []), choices[0]["message"]]}, None


# ---------------------------------------------------------------- answering live (a simulation)

NOT_HELD = "not in the logs: the logs teacher answers only the conversations its file holds"
CHARS_PER_TOKEN = 4  # prompt_tokens_estimate's rule, for the answer too: the dataset has no usage


def simulated_price(teacher: TeacherConfig, cost: EvalCostConfig | None = None) -> Price | None:
    """What the logs teacher's answers are priced at: the API `eval.cost.teacher_priced_as` names,
    else the recipe's `teacher.price` (what the ledger would charge), else None ($0)."""
    api = cost.api_price() if cost is not None else None
    if api is not None and cost is not None:
        return Price(api.input_per_mtok, api.output_per_mtok, f"priced as {cost.teacher_priced_as} ({api.source})")
    if teacher.price is not None:
        return Price(teacher.price.input_per_mtok, teacher.price.output_per_mtok, "teacher.price")
    return None


class LogsTeacher:
    """`logs:<path>` answering live: the record's answer for a conversation the file holds, an
    error Completion for any other (module docstring). In process: no network, no retries, no
    ledger; each answer carries its simulated cost."""

    in_process = True
    forwards: frozenset[str] = frozenset()  # a record's answer is what it is, whatever the request asks

    def __init__(
        self,
        ref: str,
        cfg: TeacherConfig,
        price: Price | None = None,
        asked_as: Callable[[list[dict[str, str]]], list[dict[str, str]]] | None = None,
        split: str = "train",
    ):
        """`asked_as`: how a record's conversation reaches the teacher (the router sends the task's
        teacher prompt, `Task.teacher_messages`); None: as recorded. `split`: a dataset's split
        (capture.prompts_split), as capture imports it."""
        self.spec = f"logs:{ref}"
        self.ref = ref
        self.cfg = cfg
        self.split = split
        self.price = price
        self.asked_as = asked_as
        self.notes: list[str] = [
            "a simulation: answers come from the logs file, not from a teacher"
            + ("" if price is not None else "; unpriced (no eval.cost.teacher_priced_as or teacher.price): $0")
        ]
        self._answers: dict[str, str] | None = None

    @classmethod
    def from_config(
        cls, model: str, cfg: TeacherConfig, labels: list[str] | None = None, schema: dict | None = None
    ) -> LogsTeacher:
        """Matches conversations as recorded; the router builds it with `for_task` instead."""
        return cls(model, cfg, simulated_price(cfg))

    @classmethod
    def for_task(
        cls, ref: str, cfg: TeacherConfig, task: Task, cost: EvalCostConfig, split: str = "train"
    ) -> LogsTeacher:
        """Asked as the router asks its teacher: the task's teacher prompt around the conversation."""

        def asked_as(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
            return task.teacher_messages(conversation, few_shot=cfg.few_shot)

        return cls(ref, cfg, simulated_price(cfg, cost), asked_as, split)

    def __repr__(self) -> str:
        return f"LogsTeacher({self.spec!r})"

    def identity(self) -> dict[str, Any]:
        return {"provider": "logs", "path": self.ref}

    @property
    def held(self) -> int:
        """Distinct conversations it can answer (loads the file)."""
        return len(self._index())

    async def complete(self, messages: list[dict], params: dict | None = None) -> Completion:
        if params:
            raise ValueError(f"{self.spec} answers from its file; it takes no request parameters")
        return self.answer(messages)

    async def complete_batch(self, conversations: list[list[dict]]) -> list[Completion]:
        return [self.answer(m) for m in conversations]

    async def aclose(self) -> None:
        """Nothing is open: the records stay in memory for the next call."""

    def answer(self, messages: list[dict]) -> Completion:
        found = self._index().get(sha256_json(_turns(messages)))
        if found is None:
            return Completion(text="", source=self.spec, error=NOT_HELD, finish_reason="error")
        prompt_tokens = prompt_tokens_estimate(messages)
        completion_tokens = max(1, len(found) // CHARS_PER_TOKEN)
        cost = self.price.cost(prompt_tokens, completion_tokens) if self.price is not None else 0.0
        return Completion(
            text=found,
            source=self.spec,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
        )

    def _index(self) -> dict[str, str]:
        """Conversation hash -> answer, the first record winning where the file repeats a conversation."""
        if self._answers is None:
            imported = import_logs(self.ref, self.cfg.prompt_col, self.cfg.label_col, self.split)
            answers: dict[str, str] = {}
            for record in imported.records:
                asked = self.asked_as(record.messages) if self.asked_as is not None else record.messages
                answers.setdefault(sha256_json(_turns(asked)), record.answer)
            self._answers = answers
        return self._answers


def _turns(messages: list[dict]) -> list[dict[str, str]]:
    """Role and text only: what a record keeps of a turn, so a request's extra fields never decide a match."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]
