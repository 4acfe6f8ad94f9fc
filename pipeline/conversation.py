"""Conversations: a capture record's `messages`, read and shaped for the student and the teacher.

A capture record (notes in docs/capture.md) holds the conversation as the app sent it (system or
developer, user and earlier assistant turns) and the teacher's answer as the last assistant turn.
This module is the one place that

- reads an OpenAI-shaped message list into plain text turns (`read_messages`), refusing what the
  pipeline cannot train on by kind (tool calls, images, audio, files), so importers count it;
- splits a record into the conversation and its answer (`split_answer`);
- turns a conversation into what the student sees (`student_messages`), following the recipe's
  `model.student_input`, resolved over the data by `resolve_student_input`. Curate, finetune,
  evaluate, export's checks, the router and the loop all call it, so the student is trained,
  measured and served on the same rendered prompt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import DistillError

SYSTEM_ROLES = ("system", "developer")
TEXT_ROLES = (*SYSTEM_ROLES, "user", "assistant")
StudentInput = Literal["conversation", "user", "auto"]
Shape = Literal["conversation", "user"]
STUDENT_INPUT_FILE = "student_input.json"  # curate writes it; finetune, evaluate and export read it
# The request parameters that change the answer: kept, as sent, in a record's meta.request.
REQUEST_PARAMS = ("response_format", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed")

# Content-part types that carry text (Chat Completions, Responses API), and those we cannot train on.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
_UNSUPPORTED_PARTS = {
    "image_url": "images",
    "input_image": "images",
    "image": "images",
    "input_audio": "audio",
    "audio": "audio",
    "file": "files",
    "input_file": "files",
}


class Unsupported(ValueError):
    """A conversation holding content the pipeline cannot train on yet; `kind` names it for the count."""

    def __init__(self, kind: str):
        super().__init__(f"{kind} are not supported")
        self.kind = kind


def skipped_lines(kinds: dict[str, int]) -> list[str]:
    """One line per kind of unsupported content: what was skipped and why, never dropped without a word."""
    return [f"skipped {n} record{'s' if n != 1 else ''}: {kind} are not supported" for kind, n in sorted(kinds.items())]


def user_turn(text: str) -> list[dict[str, str]]:
    """A one-turn conversation: what a prompts file's row (or an old single-prompt record) is."""
    return [{"role": "user", "content": text}]


def read_messages(raw: Any) -> list[dict[str, str]]:
    """OpenAI chat messages -> [{"role", "content"}] with string content (text parts joined), roles
    and text exactly as sent. Raises Unsupported for tool calls, images, audio and files, and
    ValueError naming the turn for anything malformed."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("messages is not a non-empty list of turns")
    return [_read_turn(i, turn) for i, turn in enumerate(raw)]


def _read_turn(i: int, turn: Any) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise ValueError(f"turn {i} is not an object")
    role = turn.get("role")
    if role in ("tool", "function") or turn.get("tool_calls") or turn.get("function_call"):
        raise Unsupported("tool calls")
    if role == "assistant" and turn.get("audio"):
        raise Unsupported("audio")
    if role not in TEXT_ROLES:
        raise ValueError(f"turn {i} has role {role!r}, not one of {', '.join(TEXT_ROLES)}")
    return {"role": role, "content": _content(i, turn.get("content"))}


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise ValueError(f"turn {i} content is a {type(content).__name__}, not text or a list of parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _UNSUPPORTED_PARTS:
            raise Unsupported(_UNSUPPORTED_PARTS[kind])
        if kind not in _TEXT_PARTS or not isinstance(part.get(_TEXT_PARTS[kind]), str):
            raise ValueError(f"turn {i} has a content part of type {kind!r}")
        texts.append(part[_TEXT_PARTS[kind]])
    return "".join(texts)


def request_params(body: dict) -> dict[str, Any]:
    """The parameters of a chat request that change its answer, as sent (absent and null left out)."""
    return {k: body[k] for k in REQUEST_PARAMS if body.get(k) is not None}


def split_answer(messages: list[dict]) -> tuple[list[dict], str]:
    """(the conversation before the answer, the answer): a record's last turn is the assistant's
    answer, and the turn before it is a user's. ValueError says what is missing."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("does not end in an assistant answer")
    context = messages[:-1]
    check_conversation(context)
    return context, messages[-1]["content"]


def check_conversation(context: list[dict]) -> None:
    """A conversation the student can answer: it ends with a user turn."""
    if not context or context[-1].get("role") != "user":
        raise ValueError("no user turn right before the answer")


def system_text(conversation: list[dict]) -> str:
    """The conversation's system and developer turns, joined ('' when it has none)."""
    return "\n\n".join(m["content"] for m in conversation if m["role"] in SYSTEM_ROLES)


def dialogue_text(conversation: list[dict]) -> str:
    """The user and assistant turns, joined: what dedup, decontamination and selection compare
    (a system prompt is often mostly a template shared by every request)."""
    return "\n".join(m["content"] for m in conversation if m["role"] not in SYSTEM_ROLES)


def transcript(conversation: list[dict]) -> str:
    """A conversation as one text for a reader that takes a prompt (the judge): a lone user turn
    is its text; otherwise each turn is labelled with its role."""
    if len(conversation) == 1 and conversation[0]["role"] == "user":
        return conversation[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation)


def student_messages(conversation: list[dict], shape: Shape) -> list[dict[str, str]]:
    """What the student sees of a conversation (without its answer): the one place it is built.

    conversation: the turns as the app sent them, its system and developer turns joined into one
                  first system turn (chat templates take one, first; `developer` is OpenAI's newer
                  name for it), so the student is a drop-in replacement;
    user:         the system and developer turns left out (a static instruction prompt, learned
                  away); the user turns and earlier assistant turns stay."""
    if shape not in ("conversation", "user"):
        raise ValueError(f"student input shape must be conversation or user, not {shape!r}")
    turns = [{"role": m["role"], "content": m["content"]} for m in conversation if m["role"] not in SYSTEM_ROLES]
    system = system_text(conversation)
    if shape == "conversation" and any(m["role"] in SYSTEM_ROLES for m in conversation):
        return [{"role": "system", "content": system}, *turns]
    return turns


@dataclass(frozen=True)
class StudentView:
    """`model.student_input` resolved over a dataset: the shape the student is fed, and why."""

    shape: Shape
    requested: StudentInput
    system_prompts: int  # distinct system prompts in the data (an absent one counts as "")
    static_system_prompt: str | None  # the one system prompt every record shares, when it does
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudentView:
        return cls(**{k: data[k] for k in ("shape", "requested", "system_prompts", "static_system_prompt", "reason")})


def resolve_student_input(requested: StudentInput, conversations: list[list[dict]]) -> StudentView:
    """`auto`: a system prompt identical across the data (or none at all) is distilled away
    (`user`); one that varies carries per-request context and is kept (`conversation`)."""
    prompts = {system_text(c) for c in conversations}
    static = next(iter(prompts)) if len(prompts) == 1 else None
    if requested != "auto":
        reason = f"model.student_input={requested}"
        if requested == "user" and static is None:
            reason += f"; the data has {len(prompts)} distinct system prompts, all left out of the student's input"
        return StudentView(requested, requested, len(prompts), static or None, reason)
    if static is None:
        return StudentView(
            "conversation",
            "auto",
            len(prompts),
            None,
            f"auto: {len(prompts)} distinct system prompts carry per-request context, kept",
        )
    if static == "":
        return StudentView(
            "user",
            "auto",
            1,
            None,
            "auto: no system prompt in the data; the student sees the "
            "user and assistant turns (the task file's instructions, if the teacher had them, "
            "are learned away)",
        )
    return StudentView("user", "auto", 1, static, "auto: one system prompt shared by every record, learned away")


def write_student_view(folder: Path, view: StudentView) -> None:
    from pipeline.artifacts import atomic_write_json

    atomic_write_json(Path(folder) / STUDENT_INPUT_FILE, view.to_json())


def read_student_view(folder: Path) -> StudentView:
    """The view curate resolved. A curated folder from before `model.student_input` fed the
    student the user turn alone: `user`."""
    path = Path(folder) / STUDENT_INPUT_FILE
    if not path.is_file():
        return StudentView("user", "user", 0, None, "curated before model.student_input: user turn only")
    try:
        return StudentView.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise DistillError(f"{path}: not a student input record ({type(err).__name__}: {err})") from None


def conversation_of(row: dict) -> list[dict[str, str]]:
    """A curated row's conversation: its `messages`, or an old single-prompt row's `prompt`."""
    messages = row.get("messages")
    if messages:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    return user_turn(row["prompt"])
