"""The task file: what the teacher is told, the label set, and a few worked examples."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import DistillError


class WorkedExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    label: str


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Literal["classification", "generation", "extraction"] = "classification"
    description: str = ""
    instructions: str = Field(description="System prompt given to the teacher.")
    labels: list[str] = Field(default_factory=list, description="Label set (classification).")
    examples: list[WorkedExample] = Field(default_factory=list)
    output_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema every answer must satisfy (extraction); checked by curate."
    )
    answer_regex: str | None = Field(
        None, description="Regex every (whole) answer must match; checked by curate."
    )

    @model_validator(mode="after")
    def _labels_consistent(self) -> Task:
        if self.kind == "classification" and len(self.labels) < 2:
            raise ValueError("a classification task needs at least two labels")
        if self.kind == "extraction" and self.output_schema is None:
            raise ValueError("an extraction task needs an output_schema (JSON Schema)")
        if self.output_schema is not None:
            _check_schema(self.output_schema)
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as err:
                raise ValueError(f"answer_regex is not a valid regex ({err})") from None
        unknown = [e.label for e in self.examples if self.labels and e.label not in self.labels]
        if unknown:
            raise ValueError(f"examples use labels not in the label set: {sorted(set(unknown))}")
        return self

    def teacher_messages(self, prompt: str, few_shot: bool = True) -> list[dict[str, str]]:
        """The full teacher context: instructions, worked examples as prior turns, the prompt."""
        messages = [{"role": "system", "content": self.instructions}]
        if few_shot:
            for ex in self.examples:
                messages += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.label}]
        return messages + self.student_messages(prompt)

    @staticmethod
    def student_messages(prompt: str) -> list[dict[str, str]]:
        """What the student sees: the user's message alone. It is trained, evaluated, exported
        and served on exactly this, so this is the one place the student's prompt is built."""
        return [{"role": "user", "content": prompt}]

    @staticmethod
    def student_example(prompt: str, answer: str) -> list[dict[str, str]]:
        """One training conversation: the student's turn exactly as it is served, then the answer."""
        return Task.student_messages(prompt) + [{"role": "assistant", "content": answer}]

    def normalize_label(self, answer: str) -> str | None:
        """Map a free-text answer to a label: exact after case/punctuation folding, else None."""
        folded = _fold(answer)
        by_fold = {_fold(label): label for label in self.labels}
        return by_fold.get(folded)


def _check_schema(schema: dict[str, Any]) -> None:
    """Fail at load time on a malformed schema rather than rejecting every answer later."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as err:
        raise ValueError(f"output_schema is not a valid JSON Schema ({err.message})") from None


def _fold(text: str) -> str:
    return re.sub(r"[\s\-]+", "_", text.strip().strip(".!\"'`").lower())


def load_task(path: Path) -> Task:
    if not Path(path).is_file():
        raise DistillError(f"{path}: task file not found")
    try:
        raw = yaml.safe_load(Path(path).read_text())
        return Task.model_validate(raw)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DistillError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML") from None
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(map(str, first["loc"]))
        raise DistillError(f"{path}: {loc + ': ' if loc else ''}{first['msg']}") from None


def parse_json(text: str) -> Any | None:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def agrees(task: Task, answer: str, reference: str) -> bool:
    """Classification: same label after normalisation. Extraction: same JSON. Else equal after trimming."""
    if task.kind == "classification":
        label = task.normalize_label(answer)
        return label is not None and label == task.normalize_label(reference)
    if task.kind == "extraction":
        a, r = parse_json(answer), parse_json(reference)
        return a is not None and a == r
    return answer.strip() == reference.strip()
