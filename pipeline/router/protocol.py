"""OpenAI chat-completions request and response models.

Requests are lenient (`extra="allow"`): OpenAI clients send many optional fields
(`stop`, `seed`, `tools`, ...) and refusing them would break ordinary clients. What we
don't implement is named in one log line per request (`ignored_fields`), never silently
dropped without a trace. Values are not logged: they may carry prompt text.
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

    def as_template_message(self) -> dict[str, str]:
        """The plain {role, content} dict a chat template expects."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # `developer` is OpenAI's newer name for `system`; chat templates only know the latter.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name for max_tokens
    # The student decodes greedily (what evaluation measured), so sampling knobs are
    # accepted for compatibility and have no effect.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = 1
    stream: bool = False
    user: str | None = None

    def ignored_fields(self) -> list[str]:
        """Names of fields sent that this server does not implement, top level and per message."""
        names = set(self.model_extra or {})
        for message in self.messages:
            names.update(f"messages[].{k}" for k in message.model_extra or {})
        return sorted(names)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "distill"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
