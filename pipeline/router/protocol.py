"""OpenAI chat-completions request and response models.

Requests are lenient (`extra="allow"`): OpenAI clients send many optional fields
(`tools`, `metadata`, ...) and refusing them would break ordinary clients. What we
don't implement is named in one log line per request (`ignored_fields`), never silently
dropped without a trace. Values are not logged: they may carry prompt text. Fields that
change the answer (`temperature`, `top_p`, `seed`, `stop`) or what it carries (`logprobs`,
`top_logprobs`) are declared: the app honours them or refuses them with a 400 naming the field.

Every response, and every stream chunk, carries a `distill` object (route, confidence,
policy hash, request id) besides the `x-distill-*` headers, because some SDKs hide headers.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_record_message(self) -> dict[str, str]:
        """{role, content} as the app sent it, text parts joined: a capture record's turn. What the
        student and the teacher are shown of it is pipeline/conversation.py's business."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name for max_tokens
    # The student decodes greedily (what evaluation measured): the app accepts only the
    # values that mean greedy (temperature 0, top_p 1) and refuses the rest.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None  # greedy decoding is deterministic: any seed is honoured
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def conversation(self) -> list[dict[str, str]]:
        """Every turn as the app sent it: what the student answers (in the shape it was trained on),
        what the teacher is asked on escalation, and what the escalation log records."""
        return [m.as_record_message() for m in self.messages]

    def ignored_fields(self) -> list[str]:
        """Names of fields sent that this server does not implement, top level and per message."""
        names = set(self.model_extra or {})
        for message in self.messages:
            names.update(f"messages[].{k}" for k in message.model_extra or {})
        return sorted(names)


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
