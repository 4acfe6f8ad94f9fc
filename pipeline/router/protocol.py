"""OpenAI chat-completions request and response models.

Requests are lenient about unknown fields (`extra="allow"`): OpenAI clients send many
optional ones (`tools`, `metadata`, ...) and refusing them would break ordinary clients. What
we don't implement is named in one log line per request (`ignored_fields`), never silently
dropped without a trace. Values are not logged: they may carry prompt text. Fields that
change the answer (`temperature`, `top_p`, `seed`, `stop`) or what it carries (`logprobs`,
`top_logprobs`) are declared: the app honours them or refuses them with a 400 naming the field.

Declared fields are strict: `max_tokens: true` or `stream: "yes"` is a 400, not 1 and True
(pydantic's lax mode would coerce them). Every string must be valid Unicode: a lone surrogate
(`"\\ud800"`, legal in JSON) is refused here, before it can reach a tokenizer in a shared batch.

Every response, and every stream chunk, carries a `distill` object (route, confidence,
policy hash, request id) besides the `x-distill-*` headers, because some SDKs hide headers.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

IGNORED_SHOWN = 10  # ignored field names named in the log line; the rest are counted
IGNORED_NAME_CHARS = 64  # each name is cut there: a client chooses them


def _unicode(value):
    """Text every tokenizer and log can take: no lone surrogates (JSON's "\\ud800" escapes).
    A field validator, not an annotated type, so an error names the field, not a union branch."""
    texts = value if isinstance(value, list) else [value]
    for text in texts:
        text = getattr(text, "text", text)
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("not valid Unicode (a lone surrogate escape such as \\ud800)") from None
    return value


Number = Annotated[float, Field(strict=True)]  # JSON numbers only: true or "1" is no temperature


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    content_is_unicode = field_validator("content")(_unicode)

    def as_record_message(self) -> dict[str, str]:
        """{role, content} as the app sent it, text parts joined: a capture record's turn. What the
        student and the teacher are shown of it is pipeline/conversation.py's business."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # newer name for max_tokens
    # The student decodes greedily (what evaluation measured): the app accepts only the
    # values that mean greedy (temperature 0, top_p 1) and refuses the rest.
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    seed: StrictInt | None = None  # greedy decoding is deterministic: any seed is honoured
    stop: str | list[str] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: dict | None = None
    user: str | None = None

    text_is_unicode = field_validator("model", "stop", "user")(_unicode)

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def conversation(self) -> list[dict[str, str]]:
        """Every turn as the app sent it: what the student answers (in the shape it was trained on),
        what the teacher is asked on escalation, and what the escalation log records."""
        return [m.as_record_message() for m in self.messages]

    def has_user_text(self) -> bool:
        """Whether some user turn says something: a system prompt alone is nothing to answer or learn from."""
        return any(m.role == "user" and m.as_record_message()["content"].strip() for m in self.messages)

    def ignored_fields(self) -> list[str]:
        """Names of fields sent that this server does not implement, top level and per message."""
        names = set(self.model_extra or {})
        for message in self.messages:
            names.update(f"messages[].{k}" for k in message.model_extra or {})
        return sorted(names)


def describe_ignored(names: list[str]) -> str:
    """Client-chosen field names fit for one log line: each repr()'d (a newline in a name cannot
    forge a log line) and cut, at most IGNORED_SHOWN of them, the rest counted."""
    shown = [repr(n if len(n) <= IGNORED_NAME_CHARS else n[:IGNORED_NAME_CHARS] + "...") for n in names[:IGNORED_SHOWN]]
    more = f" and {len(names) - IGNORED_SHOWN} more" if len(names) > IGNORED_SHOWN else ""
    return ", ".join(shown) + more


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprob(TopLogprob):
    """One answer token, as OpenAI returns it under choices[].logprobs.content[]."""

    top_logprobs: list[TopLogprob]  # the k likeliest tokens at this position (k = top_logprobs asked)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DistillInfo(BaseModel):
    """Which system answered, and why: the body's copy of the x-distill-* headers."""

    # student | teacher | student-fallback; with serve.tiers also tier:<name> and tier:<name>-fallback
    route: str = Field(pattern=r"^(student|teacher|student-fallback|tier:[A-Za-z0-9._-]+(-fallback)?)$")
    confidence: float | None
    policy: str  # policy hash
    request_id: str
    mode: str
    reason: str
    # Route teacher: the teacher spec's provider; `logs` marks a dataset's answer standing in for a
    # teacher (a simulation, `distill loop-sim`). None on the other routes.
    source: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    distill: DistillInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    distill: DistillInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "distill"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
