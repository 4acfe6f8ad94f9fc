"""Hard gates: answers the router escalates whatever their confidence.

An answer cut off at the token limit, one that is not one of a classification task's labels,
one that fails the task's `answer_regex` or `output_schema`, and one that reads as a refusal
(curate's `refusal_patterns`, the same regexes that keep refusals out of training) is not an
answer the student should give, however sure it is of its tokens. Evaluation writes the gates
into router_policy.json from the task and recipe; the server and evaluation's replay apply them
through `Policy.decide`, so both see the same rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class Gates:
    answer_regex: str | None = None  # the whole answer must match (re.fullmatch, after trimming)
    output_schema: dict[str, Any] | None = None  # the answer must be JSON valid against it
    refusal_patterns: tuple[str, ...] = field(default_factory=tuple)  # searched anywhere, case-insensitive

    @classmethod
    def for_task(cls, task, refusal_patterns: list[str] | tuple[str, ...] = ()) -> Gates:
        # Refusal patterns are for free text: a classification answer is a label or it is gated anyway.
        refusals = tuple(refusal_patterns) if task.kind != "classification" else ()
        return cls(task.answer_regex, task.output_schema, refusals)

    def failure(self, text: str) -> str | None:
        """Why this answer is escalated regardless of confidence; None when it passes every gate."""
        answer = text.strip()
        if self.answer_regex is not None and self._regex.fullmatch(answer) is None:
            return "answer does not match the task's answer_regex"
        if self.output_schema is not None:
            reason = self._schema_failure(answer)
            if reason:
                return reason
        for pattern in self._refusals:
            if pattern.search(answer):
                return f"answer reads as a refusal ({pattern.pattern!r})"
        return None

    def _schema_failure(self, answer: str) -> str | None:
        try:
            value = json.loads(answer)
        except ValueError:
            return "answer is not JSON (the task has an output_schema)"
        error = next(iter(self._validator.iter_errors(value)), None)
        return None if error is None else f"answer fails the task's output_schema ({error.message})"

    @cached_property
    def _regex(self) -> re.Pattern:
        return re.compile(self.answer_regex)

    @cached_property
    def _refusals(self) -> list[re.Pattern]:
        return [re.compile(p, re.IGNORECASE) for p in self.refusal_patterns]

    @cached_property
    def _validator(self):
        from jsonschema.validators import validator_for

        return validator_for(self.output_schema)(self.output_schema)

    def to_json(self) -> dict[str, Any]:
        return {
            "answer_regex": self.answer_regex,
            "output_schema": self.output_schema,
            "refusal_patterns": list(self.refusal_patterns),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Gates:
        data = data or {}
        return cls(data.get("answer_regex"), data.get("output_schema"), tuple(data.get("refusal_patterns") or ()))
