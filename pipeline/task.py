"""The task file: what the teacher is told, the label set, and a few worked examples."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.conversation import SYSTEM_ROLES
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
    instructions: str = Field(
        description="System prompt given to the teacher when the app sends none of its own; '' for none."
    )
    labels: list[str] = Field(default_factory=list, description="Label set (classification).")
    examples: list[WorkedExample] = Field(default_factory=list)
    output_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema every answer must satisfy (extraction); checked by curate."
    )
    answer_regex: str | None = Field(None, description="Regex every (whole) answer must match; checked by curate.")

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

    def teacher_messages(self, conversation: list[dict], few_shot: bool = True) -> list[dict[str, str]]:
        """What the teacher is asked: the conversation as the app sent it (`developer` read as
        `system`). When the app sent no system prompt of its own, the task's instructions and
        worked examples come first: what capture sends for a prompts file, and what the router
        sends on escalation, so a teacher answers live what it answered at capture."""
        turns = [
            {"role": "system" if m["role"] in SYSTEM_ROLES else m["role"], "content": m["content"]}
            for m in conversation
        ]
        if any(m["role"] == "system" for m in turns):
            return turns
        prefix = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if few_shot:
            for ex in self.examples:
                prefix += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.label}]
        return prefix + turns

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


def gold_text(value: Any) -> str:
    """A gold answer as text: "" when absent, a JSON record (extraction gold given as an object) as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_json(text: str) -> Any | None:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def record_fields(text: str) -> dict[str, Any] | None:
    """An extraction answer as {field: value}, nested objects flattened to dotted names and absent
    values (null, [], "") as None; None when the answer is not a JSON object."""
    value = parse_json(text)
    if not isinstance(value, dict):
        return None
    out: dict[str, Any] = {}

    def walk(obj: dict, prefix: str) -> None:
        for key, v in obj.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = None if v in (None, [], "", {}) else v

    walk(value, "")
    return out


def same_field(answer: dict[str, Any], reference: dict[str, Any], key: str) -> bool:
    """One top-level field of two JSON objects agrees (absent, null, [] and "" alike)."""

    def present(v: Any) -> Any:
        return None if v in (None, [], "", {}) else v

    return same_value(present(answer.get(key)), present(reference.get(key)))


def same_value(a: Any, b: Any) -> bool:
    """Field equality: a list is a set of items (order does not matter), 2 == 2.0, true is not 1."""
    if isinstance(a, list) and isinstance(b, list):
        return sorted(map(_canonical, a)) == sorted(map(_canonical, b))
    return _canonical(a) == _canonical(b)


def _canonical(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def agrees(task: Task, answer: str, reference: str, fields: list[str] | tuple[str, ...] | None = None) -> bool:
    """Classification: same label after normalisation. Extraction: the same record, every field
    equal (`same_value`), or only `fields` when given. Else equal after trimming."""
    if task.kind == "classification":
        label = task.normalize_label(answer)
        return label is not None and label == task.normalize_label(reference)
    if task.kind == "extraction":
        a, r = record_fields(answer), record_fields(reference)
        if a is None or r is None:
            return False
        keys = list(fields) if fields else sorted(set(a) | set(r))
        return all(same_value(a.get(k), r.get(k)) for k in keys)
    return answer.strip() == reference.strip()
