"""Parity: every exported artifact answers the test split again, in the runtime it will be served by.

    .venv/bin/pytest -q tests/export/test_export_gguf.py tests/export/test_export_stage.py

Merged runs in transformers, each GGUF in llama.cpp (llama-cpp-python), on the same prompts,
scored with evaluation's `agrees` against the teacher and the same bootstrap CI. Before that,
each GGUF is checked where conversions silently go wrong: BOS/EOS ids and the chat template in
its metadata, llama.cpp's own rendering of the template, and its tokenizer on the rendered
verification prompts. F16 is then teacher-forced on the merged model's greedy answers: every
answer token's log-probability within `export.f16_logprob_tolerance` of merged's, and no token
more than that below F16's own top choice (exact greedy equality would hinge on near-ties, which
differ between CPUs' kernels). Quantized files are judged by agreement with the teacher, within `export.parity_tolerance` of
the merged model. Writes nothing itself: `table_json` / `table_markdown` give parity.json/.md.

Structured output (an extraction task served under its schema): merged decodes under it with
xgrammar, as evaluated and served; each GGUF under llama.cpp's own grammar converted from the
same schema (structured.gbnf), as `serve.student=llama.cpp` and a llama.cpp server decode. Every
row then also carries its schema-valid rate and its field F1 against merged's answers, and a
GGUF whose schema-valid rate falls more than the tolerance below merged's is rejected.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from pipeline.llm.completion import Completion
from pipeline.llm.gguf_runtime import GgufModel

if TYPE_CHECKING:
    import numpy as np

PARITY_JSON = "parity.json"
PARITY_MD = "parity.md"


@dataclass
class Answers:
    """One artifact's greedy answers to a prompt set, with how long loading and answering took."""

    completions: list[Completion]
    load_s: float
    answer_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(c.completion_tokens or 0 for c in self.completions) / max(self.answer_s, 1e-9)

    @property
    def stop_rate(self) -> float:
        return sum(c.stopped for c in self.completions) / max(len(self.completions), 1)


@dataclass
class ArtifactParity:
    artifact: str
    path: str
    size_bytes: int
    load_s: float | None = None
    tokens_per_s: float | None = None
    agreement: dict | None = None  # Figure.to_json(): value, lo, hi, n
    delta_vs_merged: float | None = None
    eos_stop_rate: float | None = None
    bits_per_weight: float | None = None
    tensor_types: dict[str, int] | None = None
    verify_max_logprob_delta: float | None = None  # nats; the reference type against merged (logprob_gap)
    verify_logprob_tolerance: float | None = None
    schema_valid_rate: float | None = None  # structured output: answers valid against the task's schema
    field_f1_vs_merged: dict | None = None  # structured output: Figure.to_json() of field F1 against merged's answers
    status: str = "accepted"  # accepted | rejected
    reasons: list[str] = field(default_factory=list)
    runtime: str = ""
    note: str = ""

    def reject(self, reason: str) -> None:
        self.status = "rejected"
        self.reasons.append(reason)

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- llama.cpp side


def gguf_answers(
    model: GgufModel, conversations: list[list[dict]], max_new_tokens: int, schema: dict | None = None
) -> Answers:
    """Greedy answers in llama.cpp; under llama.cpp's grammar for `schema` when given."""
    from pipeline.llm.structured import gbnf

    completions, answer_s = model.answer_all(conversations, max_new_tokens, gbnf(schema) if schema else None)
    return Answers(completions, model.load_s, answer_s)


def gguf_problems(model: GgufModel, metadata: dict, tokenizer, conversations: list[list[dict]]) -> list[str]:
    """What makes this GGUF prompt or stop differently from the HF tokenizer it came from."""
    problems = []
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if eos != tokenizer.eos_token_id:
        problems.append(
            f"EOS id {eos} in the GGUF, but the tokenizer's EOS is {tokenizer.eos_token_id} "
            f"({tokenizer.eos_token!r}): llama.cpp runtimes would not stop where the model was trained to"
        )
    if tokenizer.bos_token_id is not None and metadata.get("tokenizer.ggml.bos_token_id") != tokenizer.bos_token_id:
        problems.append(
            f"BOS id {metadata.get('tokenizer.ggml.bos_token_id')} in the GGUF, tokenizer has {tokenizer.bos_token_id}"
        )
    if metadata.get("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("the chat template in the GGUF is not the tokenizer's")
    for conv in conversations:
        expected = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        rendered = model.render(conv)
        if rendered != expected:
            problems.append(
                f"llama.cpp renders the chat template differently on {_short(conv)}: "
                f"{_first_diff(rendered or '', expected)}"
            )
            break
        want = tokenizer(expected, add_special_tokens=False)["input_ids"]
        got = model.tokenize(expected)
        if got != want:
            problems.append(
                f"llama.cpp tokenizes {_short(conv)} differently ({len(got)} vs {len(want)} tokens, "
                f"first difference at token {_first_index(got, want)})"
            )
            break
    return problems


# ---------------------------------------------------------------- transformers side


def hf_answers(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    batch_size: int,
    load_s: float,
    schema: dict | None = None,
) -> Answers:
    """Merged's greedy answers (under `schema` when the student is served under one). Greedy, whatever
    `router.decode` says: GGUF runtimes generate, and parity measures what the conversion changed,
    not what the decoding does."""
    from pipeline.llm.answer import Serving, answer_as_served

    start = time.perf_counter()
    serving = Serving("generate", None, max_new_tokens, batch_size, schema)
    completions = answer_as_served(model, tokenizer, conversations, serving, source="merged")
    return Answers(completions, load_s, time.perf_counter() - start)


# ---------------------------------------------------------------- scoring and the gate


def score(row: ArtifactParity, answers: Answers, references: list[str], task) -> list[bool]:
    """Fill the row's figures from its answers; returns the per-prompt agreement."""
    from pipeline.stats import mean_figure
    from pipeline.task import agrees

    hits = [agrees(task, c.text, ref) for c, ref in zip(answers.completions, references)]
    row.agreement = mean_figure([float(h) for h in hits]).to_json()
    row.eos_stop_rate = answers.stop_rate
    row.load_s = answers.load_s
    row.tokens_per_s = answers.tokens_per_s
    return hits


def judge(row: ArtifactParity, merged: ArtifactParity, tolerance: float) -> None:
    """Reject a row whose agreement or EOS stop rate falls more than `tolerance` below merged's."""
    assert row.agreement is not None and merged.agreement is not None, "judge() compares scored rows"
    assert row.eos_stop_rate is not None and merged.eos_stop_rate is not None, "judge() compares scored rows"
    delta = row.delta_vs_merged = row.agreement["value"] - merged.agreement["value"]
    if delta < -tolerance - 1e-9:
        row.reject(
            f"agreement {100 * row.agreement['value']:.1f}% is {-100 * delta:.1f} points below "
            f"merged's {100 * merged.agreement['value']:.1f}% (export.parity_tolerance="
            f"{100 * tolerance:.1f} points)"
        )
    stop_drop = merged.eos_stop_rate - row.eos_stop_rate
    if stop_drop > tolerance + 1e-9:
        row.reject(f"EOS stop rate {100 * row.eos_stop_rate:.1f}% is {100 * stop_drop:.1f} points below merged's")
    if row.schema_valid_rate is not None and merged.schema_valid_rate is not None:
        valid_drop = merged.schema_valid_rate - row.schema_valid_rate
        if valid_drop > tolerance + 1e-9:
            row.reject(
                f"schema-valid rate {100 * row.schema_valid_rate:.1f}% is {100 * valid_drop:.1f} points below merged's"
            )


@dataclass
class ForcedReference:
    """The merged model's greedy answer to one verification prompt and, teacher-forced on it, its
    next-token log-softmax rows at every answer position and the stop after it."""

    conversation: list[dict]
    prompt_ids: list[int]
    answer_ids: list[int]
    rows: np.ndarray  # [len(answer_ids) + 1, vocab]
    stopped: bool


def forced_references(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[ForcedReference]:
    """What the F16 file is held to, computed in transformers on the merged folder."""
    from pipeline.export.merged import answer_logprobs, generated_ids
    from pipeline.llm.generate import generate_batch

    answers = generate_batch(model, tokenizer, conversations, max_new_tokens)
    references = []
    for conv, answer in zip(conversations, answers):
        prompt = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = generated_ids(answer)
        rows = answer_logprobs(model, tokenizer, conv, answer_ids).numpy()
        references.append(ForcedReference(conv, ids, list(answer_ids), rows, answer.stopped))
    return references


def logprob_gap(model: GgufModel, reference: ForcedReference) -> float:
    """Teacher-forced on the reference answer, the larger of (a) how far llama.cpp's log-probability
    of each reference token (and of the reference's stop token) is from transformers' and (b) how far
    below llama.cpp's own top choice that token falls. Small on both counts: the file answers as the
    merged model does, wherever the answer does not hinge on a near-tie."""
    got = model.forced_logprobs(reference.prompt_ids, reference.answer_ids)
    want = reference.rows
    tokens = list(reference.answer_ids) + ([int(want[-1].argmax())] if reference.stopped else [])
    gap = 0.0
    for i, token in enumerate(tokens):
        gap = max(gap, abs(float(got[i, token]) - float(want[i, token])), float(got[i].max()) - float(got[i, token]))
    return gap


def check_reference_type(
    row: ArtifactParity, model: GgufModel, references: list[ForcedReference], tolerance: float
) -> None:
    """F16 is held to the merged model's teacher-forced log-probabilities on the verification prompts."""
    gaps = [logprob_gap(model, r) for r in references]
    worst = max(range(len(gaps)), key=gaps.__getitem__, default=None)
    row.verify_max_logprob_delta = gaps[worst] if worst is not None else 0.0
    row.verify_logprob_tolerance = tolerance
    if worst is not None and gaps[worst] > tolerance:
        row.reject(
            f"teacher-forced on merged's greedy answers, log-probabilities differ by up to {gaps[worst]:.3g} "
            f"nats (export.f16_logprob_tolerance={tolerance:g}) on {_short(references[worst].conversation)}"
        )


# ---------------------------------------------------------------- the table


def table_json(rows: list[ArtifactParity], meta: dict) -> dict:
    return {**meta, "artifacts": [r.to_json() for r in rows]}


def table_markdown(rows: list[ArtifactParity], meta: dict) -> str:
    head = (
        "| artifact | size | bits/weight | load s | tok/s | agreement [95% CI] | Δ vs merged | EOS stop | status |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    structured = [r for r in rows if r.schema_valid_rate is not None]
    for r in rows:
        agreement = (
            f"{100 * r.agreement['value']:.1f}% [{100 * r.agreement['lo']:.1f}, {100 * r.agreement['hi']:.1f}]"
            if r.agreement
            else "= merged"
            if r.artifact == "adapter"
            else "not measured"
        )
        status = f"{r.status}: {'; '.join(r.reasons)}" if r.reasons else r.status + (f" ({r.note})" if r.note else "")
        lines.append(
            " | ".join(
                [
                    f"| {r.artifact}",
                    _size(r.size_bytes),
                    f"{r.bits_per_weight:.2f}" if r.bits_per_weight else "",
                    _num(r.load_s, 2),
                    _num(r.tokens_per_s, 1),
                    agreement,
                    f"{100 * r.delta_vs_merged:+.1f} pts" if r.delta_vs_merged is not None else "",
                    f"{100 * r.eos_stop_rate:.0f}%" if r.eos_stop_rate is not None else "",
                    status + " |",
                ]
            )
        )
    if structured:
        lines += [
            "",
            "Structured output (merged: xgrammar under the task's schema; GGUF: llama.cpp's grammar "
            "converted from it):",
            "",
            "| artifact | schema-valid | field F1 vs merged [95% CI] |",
            "|---|---|---|",
        ]
        for r in structured:
            f1, valid = r.field_f1_vs_merged, r.schema_valid_rate
            assert valid is not None  # structured: the rows that have it
            lines.append(
                f"| {r.artifact} | {100 * valid:.1f}% | "
                + (f"{f1['value']:.3f} [{f1['lo']:.3f}, {f1['hi']:.3f}] |" if f1 else "1.000 (reference) |")
            )
    notes = [
        "",
        f"{meta['test_examples']} test prompts, agreement with the teacher's answers (bootstrap 95% CI over prompts); "
        f"tolerance {100 * meta['tolerance']:.1f} points. merged: transformers, batches of {meta['batch_size']}; "
        "gguf: llama.cpp, one request at a time (tok/s includes prompt processing).",
    ]
    for r in rows:
        if r.tensor_types and len(r.tensor_types) > 2:
            mix = ", ".join(f"{n} {t}" for t, n in sorted(r.tensor_types.items(), key=lambda kv: -kv[1]))
            notes.append(
                f"{r.artifact}: {r.bits_per_weight:.2f} bits/weight from its file size; tensors: {mix} "
                "(k-quants fall back to legacy types where a row is not a multiple of 256)."
            )
    return "\n".join(lines + notes) + "\n"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _short(conv: list[dict]) -> str:
    return repr(conv[-1]["content"][:40])


def _first_index(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _first_diff(a: str, b: str) -> str:
    i = _first_index(list(a), list(b))
    return f"{a[max(0, i - 10) : i + 20]!r} vs {b[max(0, i - 10) : i + 20]!r}"
