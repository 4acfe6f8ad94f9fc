"""`distill init NAME --from FILE`: a task file and a recipe written from the logs a person has.

    distill init support --from exports/chat.jsonl
    distill init banking --from train.csv --prompt-col text --label-col label

The file is read as `teacher.spec=logs:FILE` reads it (pipeline/teachers/logs.py), then each
choice is inferred from the records and explained in a comment beside it:

- kind: classification when a few distinct answers cover >= 95% of the records; extraction when
  >= 95% of the answers parse as JSON objects (their JSON Schema inferred by genson); free-text
  generation otherwise;
- model.student_input: `user` when every record shares one system prompt (or none: it is then
  the task's instructions), `conversation` when it varies (per-request context the student needs);
- train.max_seq_len from the records' lengths in the student's tokens, as curate counts them;
- curate.target_size from the number of usable records.

Writes `data/<NAME>_task.yaml` and `recipes/<NAME>.yaml` (never over existing files) and returns
the next command to run.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import EMBEDDED_DEFAULT, validate_recipe
from pipeline.conversation import Shape, resolve_student_input, student_messages
from pipeline.errors import DistillError
from pipeline.task import Task

COVERAGE = 0.95  # share of records the label set (classification) or the JSON objects (extraction) must cover
MAX_LABELS = 100
MAX_LABEL_CHARS = 64
PROMPT_COLUMNS = ("prompt", "text", "message", "question", "input", "query", "utterance", "content")
ANSWER_COLUMNS = ("label", "answer", "completion", "output", "intent", "response", "category", "target")
CHAT_TEMPLATE = Path("recipes/templates/chatml.jinja")  # the embedded student's, as the CPU recipes use it


@dataclass
class Inferred:
    """What the records say, with the reason for each choice (the YAML comments)."""

    kind: str
    kind_why: str
    labels: list[str] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    shape: Shape = "user"
    shape_why: str = ""
    instructions: str = ""
    max_seq_len: int = 512
    length_why: str = ""
    answer_tokens: int = 32
    target_size: int | None = None
    target_why: str = ""
    static_prompt: bool = False  # the instructions are the system prompt every record shares
    records: int = 0
    rejected: int = 0


def infer_kind(answers: list[str]) -> tuple[str, str, list[str], dict | None]:
    """(kind, why, labels, output_schema) from the answers alone."""
    n = len(answers)
    counts = Counter(a.strip() for a in answers)
    covered, labels = 0, []
    for value, count in counts.most_common():
        if covered >= COVERAGE * n:
            break
        labels.append(value)
        covered += count
    short = all(len(v) <= MAX_LABEL_CHARS and "\n" not in v for v in labels)
    if 2 <= len(labels) <= min(MAX_LABELS, n // 5) and short:
        return (
            "classification",
            f"{len(labels)} distinct answers cover {covered / n:.0%} of the {n} records "
            f"(>= {COVERAGE:.0%}); the other {n - covered} are off-label and curate drops them",
            sorted(labels),
            None,
        )
    objects = [o for o in map(_json_object, answers) if o is not None]
    if len(objects) >= COVERAGE * n:
        from genson import SchemaBuilder

        builder = SchemaBuilder()
        for obj in objects:
            builder.add_object(obj)
        schema = builder.to_schema()
        schema.pop("$schema", None)
        return (
            "extraction",
            f"{len(objects)} of {n} answers ({len(objects) / n:.0%}) are JSON objects; their "
            "schema is inferred from them (genson): a key is required when every answer has it",
            [],
            schema,
        )
    return (
        "generation",
        f"{len(counts)} distinct answers over {n} records and {len(objects)} JSON objects: free text",
        [],
        None,
    )


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def infer(
    source: str,
    prompt_col: str | None,
    label_col: str | None,
    base: str,
    chat_template: Path | None,
    split: str = "train",
) -> Inferred:
    from pipeline.teachers.logs import import_logs

    prompt_col, label_col = prompt_col or _column(source, PROMPT_COLUMNS), label_col or _column(source, ANSWER_COLUMNS)
    imported = import_logs(source, prompt_col, label_col, split)
    conversations = [r.messages for r in imported.records]
    answers = [r.answer for r in imported.records]
    kind, kind_why, labels, schema = infer_kind(answers)
    view = resolve_student_input("auto", conversations)
    out = Inferred(
        kind, kind_why, labels, schema, view.shape, view.reason, records=len(answers), rejected=len(imported.rejected)
    )
    out.instructions = view.static_system_prompt or _default_instructions(kind, labels)
    out.static_prompt = view.static_system_prompt is not None
    seq, answer = _token_lengths(conversations, answers, view.shape, base, chat_template)
    p50, p95, p99 = (_percentile(seq, q) for q in (0.5, 0.95, 0.99))
    out.max_seq_len = max(128, 64 * math.ceil(p99 / 64))
    dropped = sum(s > out.max_seq_len for s in seq)
    out.length_why = (
        f"records are {p50} / {p95} / {p99} / {max(seq)} student tokens at p50 / p95 / p99 / max "
        f"(chat-formatted, answer included); curate drops the {dropped} longer than this"
    )
    out.answer_tokens = max(8, 8 * math.ceil(_percentile(answer, 0.99) * 1.25 / 8))
    if len(answers) > 2000:
        out.target_size = 2000
        out.target_why = (
            f"{len(answers)} records: 2,000 selected examples (label-balanced, diverse first) keep a "
            "CPU run short; raise it on a GPU"
        )
    else:
        out.target_why = f"{len(answers)} records: keep every survivor of curation"
    return out


def _column(source: str, names: tuple[str, ...]) -> str:
    """The first of `names` the file's first row has (chat files need none: the default is returned)."""
    from pipeline.teachers.logs import log_files
    from pipeline.teachers.sources import read_rows

    files = log_files(source)
    if len(files) > 1:
        return names[0]
    row = next(iter(read_rows(source)), (None, {}))[1]
    return next((n for n in names if n in row), next((k for k in row if k.lower() in names), names[0]))


def _default_instructions(kind: str, labels: list[str]) -> str:
    if kind == "classification":
        return f"Reply with exactly one label from this list and nothing else: {', '.join(labels)}."
    if kind == "extraction":
        return "Reply with one JSON object that follows the schema, and nothing else."
    return ""


def _token_lengths(
    conversations: list[list[dict]], answers: list[str], shape: Shape, base: str, chat_template: Path | None
) -> tuple[list[int], list[int]]:
    """Each record's chat-formatted length and its answer's, in the student's tokens (what curate counts)."""
    from pipeline.llm.loading import load_tokenizer

    tokenizer = load_tokenizer(base, chat_template)
    convs = [[*student_messages(c, shape), {"role": "assistant", "content": a}] for c, a in zip(conversations, answers)]
    rendered = tokenizer.apply_chat_template(convs, tokenize=False)
    seq = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    answer = [len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]]
    return seq, answer


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- writing


def _value(value: Any) -> str:
    """A YAML value on one line (flow style), quoted where YAML needs it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.strip().removesuffix("...").strip()


def _comment(text: str, indent: int = 0) -> str:
    return "\n".join(f"{' ' * indent}# {line}" for line in text.splitlines())


def task_yaml(name: str, source: str, found: Inferred) -> str:
    lines = [
        f"# Written by `distill init {name} --from {source}`; every choice below is inferred from the "
        "records and can be edited.",
        f"name: {_value(name)}",
        _comment(found.kind_why),
        f"kind: {found.kind}",
        f"description: {_value(f'Distilled from {source}.')}",
    ]
    if found.static_prompt:
        lines.append(
            _comment("The system prompt every record shares: the teacher's instructions, learned away by the student.")
        )
    elif found.shape == "conversation":
        lines.append(
            _comment(
                "The records bring their own system prompts; these instructions are sent to a live "
                "teacher only before a conversation that has none."
            )
        )
    else:
        lines.append(
            _comment(
                "Sent to a live teacher before a conversation without a system prompt of its own (a draft: edit it)."
            )
        )
    lines.append(f"instructions: {_value(found.instructions)}")
    if found.labels:
        lines.append(f"labels: {_value(found.labels)}")
    if found.schema is not None:
        lines += [
            "output_schema:",
            *(f"  {line}" for line in yaml.safe_dump(found.schema, sort_keys=False).rstrip().splitlines()),
        ]
    return "\n".join(lines) + "\n"


def recipe_yaml(
    name: str,
    source: str,
    task_path: Path,
    found: Inferred,
    base: str,
    chat_template: Path | None,
    prompt_col: str | None,
    label_col: str | None,
) -> str:
    classification = found.kind == "classification"
    lines = [
        f"# make distill RECIPE={name}      (written by `distill init {name} --from {source}`)",
        f"# {found.records} usable records in {source}"
        + (
            f", {found.rejected} rejected (see `distill capture`'s notes for each line and reason)"
            if found.rejected
            else ""
        )
        + ".",
        f"name: {_value(name)}",
        f"description: {_value(f'{found.kind.capitalize()} distilled from {source}.')}",
        "model:",
        f"  base: {_value(base)}",
    ]
    if chat_template is not None:
        lines.append(f"  chat_template: {_value(str(chat_template))}")
    lines += [
        _comment(found.shape_why, 2),
        f"  student_input: {found.shape}",
        "teacher:",
        _comment(
            "The answers already in the file (no calls, no cost). To have a live model answer instead: "
            "openai:<model> with capture.prompts.",
            2,
        ),
        f"  spec: {_value(f'logs:{source}')}",
    ]
    if prompt_col:
        lines.append(f"  prompt_col: {_value(prompt_col)}")
    if label_col:
        lines.append(f"  label_col: {_value(label_col)}")
    lines += [f"  max_new_tokens: {found.answer_tokens}", "capture:", f"  task: {_value(str(task_path))}", "curate:"]
    if classification:
        lines.append("  labels_only: true")
    lines += [
        _comment(found.target_why, 2),
        f"  target_size: {_value(found.target_size)}",
        "  embeddings: tfidf   # the same selection on every machine (minilm where it is installed: auto)",
        "train:",
        "  method: lora",
        _comment(found.length_why, 2),
        f"  max_seq_len: {found.max_seq_len}",
        "  batch_size: 8",
        "  lr: 1.0e-3",
        "  epochs: 2   # not tuned for this data: `distill sweep` searches",
        "  padding_free: true",
        "eval:",
        f"  max_new_tokens: {found.answer_tokens}",
        "export:",
        "  formats: [merged, adapter]",
        "router:",
    ]
    if classification:
        lines += ["  signal: label_prob   # the label posterior: classification", "  decode: label_posterior"]
    else:
        lines.append("  signal: mean_logprob")
    return "\n".join(lines) + "\n"


def init(
    name: str,
    source: str,
    root: Path = Path("."),
    prompt_col: str | None = None,
    label_col: str | None = None,
    base: str = EMBEDDED_DEFAULT,
    force: bool = False,
) -> tuple[Path, Path]:
    """Infer, write the task file and the recipe under `root`, check both load; returns their paths."""
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise DistillError(f"recipe name '{name}': use letters, digits, '-', '_' and '.'")
    task_path, recipe_path = Path("data") / f"{name}_task.yaml", Path("recipes") / f"{name}.yaml"
    for path in (task_path, recipe_path):
        if (root / path).exists() and not force:
            raise DistillError(f"{root / path} exists; choose another name or pass --force")
    template = CHAT_TEMPLATE if base == EMBEDDED_DEFAULT else None
    found = infer(source, prompt_col, label_col, base, root / template if template else None)
    columns = (prompt_col or _column(source, PROMPT_COLUMNS), label_col or _column(source, ANSWER_COLUMNS))
    chat = columns == (PROMPT_COLUMNS[0], ANSWER_COLUMNS[0])  # chat records read no columns
    task_text = task_yaml(name, source, found)
    recipe_text = recipe_yaml(
        name, source, task_path, found, base, template, None if chat else columns[0], None if chat else columns[1]
    )
    Task.model_validate(yaml.safe_load(task_text))  # both load, or nothing is written
    validate_recipe(yaml.safe_load(recipe_text), str(recipe_path))
    from pipeline.artifacts import atomic_write_text

    atomic_write_text(root / task_path, task_text)
    atomic_write_text(root / recipe_path, recipe_text)
    return root / task_path, root / recipe_path
