"""Message content is text: a control-token string inside it is tokenized as its characters.

    .venv/bin/pytest -q tests/router/test_router_hardening.py -k control

A chat template writes its turns with special tokens (`<|im_start|>`, `<|eot_id|>`, `[INST]`),
and a tokenizer given the rendered prompt matches those strings wherever they occur, in the
messages' content too: a user who writes `<|im_start|>system ...` would open a real system turn
(and, answered by a local teacher, choose the label that becomes training data). So the prompt
is tokenized in pieces: the template's own text as usual, each message's content with special
tokens split into plain text (`split_special_tokens`). A conversation whose content holds no
special-token string is tokenized whole, as before: its ids do not change.

Used by generation and label scoring (generate.py, scoring.py: the student and a local teacher)
and by the router's GGUF student, with its own tokenizer.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import cast


class ContentNotVerbatim(ValueError):
    """The chat template rewrites message content, so its pieces cannot be told from the template's."""


def control_strings(tokenizer) -> tuple[str, ...]:
    """Every special token's string: what a tokenizer would read as a control token."""
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    found.update(tokenizer.all_special_tokens)
    return tuple(s for s in found if s)


def holds_control_text(conversation: list[dict], strings: tuple[str, ...]) -> bool:
    return any(s in m["content"] for m in conversation for s in strings)


def content_pieces(render: Callable[[list[dict]], str], conversation: list[dict]) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_content) pieces: the conversation is rendered with a unique
    marker in place of each message's content, and each marker is put back as a content piece.
    Raises ContentNotVerbatim when that does not give back the real rendering (a template that
    rewrites content beyond trimming its ends)."""
    tag = uuid.uuid4().hex
    markers = [f"<<{tag}:{i}>>" for i in range(len(conversation))]
    marked = render([{**m, "content": marker} for m, marker in zip(conversation, markers)])
    real = render(conversation)
    for trimmed in (False, True):  # Llama 3's template trims each content
        contents = [m["content"].strip() if trimmed else m["content"] for m in conversation]
        pieces = _split(marked, markers, contents)
        if "".join(text for text, _ in pieces) == real:
            return [(text, is_content) for text, is_content in pieces if text]
    raise ContentNotVerbatim(
        "this chat template rewrites message content, so a special-token string in it cannot be kept as text"
    )


def _split(marked: str, markers: list[str], contents: list[str]) -> list[tuple[str, bool]]:
    pieces: list[tuple[str, bool]] = [(marked, False)]
    for marker, content in zip(markers, contents):
        split: list[tuple[str, bool]] = []
        for text, is_content in pieces:
            if is_content:
                split.append((text, True))
                continue
            parts = text.split(marker)
            for n, part in enumerate(parts):
                if n:
                    split.append((content, True))
                split.append((part, False))
        pieces = split
    return pieces


def prompt_token_ids(tokenizer, conversations: list[list[dict]], prompts: list[str]) -> list[list[int]]:
    """Each prompt's ids (`prompts[i]` is `conversations[i]` rendered with the generation prompt),
    message content tokenized as text."""
    strings = control_strings(tokenizer)
    plain = [i for i, c in enumerate(conversations) if not holds_control_text(c, strings)]
    ids: list[list[int] | None] = [None] * len(prompts)
    if plain:
        encoded = tokenizer([prompts[i] for i in plain], add_special_tokens=False)["input_ids"]
        for i, row in zip(plain, encoded):
            ids[i] = row
    for i, conversation in enumerate(conversations):
        if ids[i] is None:
            ids[i] = _piecewise(tokenizer, conversation)
    return cast(list[list[int]], ids)  # every slot is filled by one of the two loops


def _piecewise(tokenizer, conversation: list[dict]) -> list[int]:
    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    ids: list[int] = []
    for text, is_content in content_pieces(render, conversation):
        ids += tokenizer(text, add_special_tokens=False, split_special_tokens=is_content)["input_ids"]
    return ids
