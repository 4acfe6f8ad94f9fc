"""Parity: every exported artifact answers the test split again, in the runtime it will be served by.

    .venv/bin/pytest -q tests/test_export_parity.py

Merged runs in transformers, each GGUF in llama.cpp (llama-cpp-python), on the same prompts,
scored with evaluation's `agrees` against the teacher and the same bootstrap CI. Before that,
each GGUF is checked where conversions silently go wrong: BOS/EOS ids and the chat template in
its metadata, llama.cpp's own rendering of the template, and its tokenizer on the rendered
verification prompts. F16 must then reproduce the merged model's greedy tokens exactly;
quantized files are judged by agreement with the teacher, within `export.parity_tolerance` of
the merged model. Writes nothing itself: `table_json` / `table_markdown` give parity.json/.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.llm.completion import Completion

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
    exact_on_verify: bool | None = None
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


class GgufModel:
    """A GGUF file loaded in llama.cpp, prompted exactly as a llama.cpp server prompts it:
    the chat template read from the file, rendered by llama-cpp-python's formatter, tokenized
    by llama.cpp with the model's own BOS rule, decoded greedily until an end-of-generation token."""

    def __init__(self, path: Path, n_ctx: int):
        import llama_cpp

        from pipeline.export.gguf import quiet_llama_cpp

        start = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)
        quiet_llama_cpp()  # after: Llama(verbose=False) resets the logger's level
        self.load_s = time.perf_counter() - start
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.template = self.llm.metadata.get("tokenizer.chat_template")

    def render(self, messages: list[dict]) -> str | None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self.template is None:
            return None
        llm = self.llm
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        return Jinja2ChatFormatter(template=self.template, eos_token=eos, bos_token=bos)(messages=messages).prompt

    def tokenize(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def answer(self, prompt_ids: list[int], max_new_tokens: int) -> Completion:
        start = time.perf_counter()
        tokens: list[int] = []
        finish = "length"
        for token in self.llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            if self._is_eog(self._vocab, token):
                finish = "stop"
                break
            tokens.append(token)
            if len(tokens) >= max_new_tokens:
                break
        text = self.llm.detokenize(tokens, special=False).decode("utf-8", errors="replace").strip()
        return Completion(text=text, source="gguf", prompt_tokens=len(prompt_ids), completion_tokens=len(tokens),
                          token_ids=tokens, finish_reason=finish,
                          latency_ms=int((time.perf_counter() - start) * 1000))

    def answer_all(self, conversations: list[list[dict]], max_new_tokens: int) -> Answers:
        start = time.perf_counter()
        completions = [self.answer(self.tokenize(self.render(c) or ""), max_new_tokens) for c in conversations]
        return Answers(completions, self.load_s, time.perf_counter() - start)

    def close(self) -> None:
        self.llm.close()


def gguf_problems(model: GgufModel, metadata: dict, tokenizer, conversations: list[list[dict]]) -> list[str]:
    """What makes this GGUF prompt or stop differently from the HF tokenizer it came from."""
    problems = []
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if eos != tokenizer.eos_token_id:
        problems.append(f"EOS id {eos} in the GGUF, but the tokenizer's EOS is {tokenizer.eos_token_id} "
                        f"({tokenizer.eos_token!r}): llama.cpp runtimes would not stop where the model was trained to")
    if tokenizer.bos_token_id is not None and metadata.get("tokenizer.ggml.bos_token_id") != tokenizer.bos_token_id:
        problems.append(f"BOS id {metadata.get('tokenizer.ggml.bos_token_id')} in the GGUF, tokenizer has "
                        f"{tokenizer.bos_token_id}")
    if metadata.get("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("the chat template in the GGUF is not the tokenizer's")
    for conv in conversations:
        expected = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        rendered = model.render(conv)
        if rendered != expected:
            problems.append(f"llama.cpp renders the chat template differently on {_short(conv)}: "
                            f"{_first_diff(rendered or '', expected)}")
            break
        want = tokenizer(expected, add_special_tokens=False)["input_ids"]
        got = model.tokenize(expected)
        if got != want:
            problems.append(f"llama.cpp tokenizes {_short(conv)} differently ({len(got)} vs {len(want)} tokens, "
                            f"first difference at token {_first_index(got, want)})")
            break
    return problems


# ---------------------------------------------------------------- transformers side


def hf_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
               load_s: float) -> Answers:
    from pipeline.llm.generate import generate_batch

    start = time.perf_counter()
    completions: list[Completion] = []
    for i in range(0, len(conversations), batch_size):
        completions += generate_batch(model, tokenizer, conversations[i : i + batch_size], max_new_tokens,
                                      source="merged")
    return Answers(completions, load_s, time.perf_counter() - start)


# ---------------------------------------------------------------- scoring and the gate


def score(row: ArtifactParity, answers: Answers, references: list[str], task) -> list[bool]:
    """Fill the row's figures from its answers; returns the per-prompt agreement."""
    from pipeline.evaluation.metrics import agrees
    from pipeline.evaluation.stats import mean_figure

    hits = [agrees(task, c.text, ref) for c, ref in zip(answers.completions, references)]
    row.agreement = mean_figure([float(h) for h in hits]).to_json()
    row.eos_stop_rate = answers.stop_rate
    row.load_s = answers.load_s
    row.tokens_per_s = answers.tokens_per_s
    return hits


def judge(row: ArtifactParity, merged: ArtifactParity, tolerance: float) -> None:
    """Reject a row whose agreement or EOS stop rate falls more than `tolerance` below merged's."""
    row.delta_vs_merged = row.agreement["value"] - merged.agreement["value"]
    if row.delta_vs_merged < -tolerance - 1e-9:
        row.reject(f"agreement {100 * row.agreement['value']:.1f}% is {-100 * row.delta_vs_merged:.1f} points below "
                   f"merged's {100 * merged.agreement['value']:.1f}% (export.parity_tolerance="
                   f"{100 * tolerance:.1f} points)")
    stop_drop = merged.eos_stop_rate - row.eos_stop_rate
    if stop_drop > tolerance + 1e-9:
        row.reject(f"EOS stop rate {100 * row.eos_stop_rate:.1f}% is {100 * stop_drop:.1f} points below merged's")


def exact_tokens(row: ArtifactParity, got: list[Completion], want: list[Completion], conversations) -> None:
    """F16 must give the merged model's greedy tokens, token for token, on the verification prompts."""
    bad = [(c, g, w) for c, g, w in zip(conversations, got, want) if g.token_ids != w.token_ids]
    row.exact_on_verify = not bad
    if bad:
        conv, g, w = bad[0]
        row.reject(f"greedy tokens differ from merged on {len(bad)}/{len(want)} verification prompts "
                   f"(first, {_short(conv)}: {g.text!r} vs {w.text!r})")


# ---------------------------------------------------------------- the table


def table_json(rows: list[ArtifactParity], meta: dict) -> dict:
    return {**meta, "artifacts": [r.to_json() for r in rows]}


def table_markdown(rows: list[ArtifactParity], meta: dict) -> str:
    head = ("| artifact | size | bits/weight | load s | tok/s | agreement [95% CI] | Δ vs merged | EOS stop | status |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        agreement = (f"{100 * r.agreement['value']:.1f}% [{100 * r.agreement['lo']:.1f}, {100 * r.agreement['hi']:.1f}]"
                     if r.agreement else "= merged")
        status = f"{r.status}: {'; '.join(r.reasons)}" if r.reasons else r.status + (f" ({r.note})" if r.note else "")
        lines.append(" | ".join([
            f"| {r.artifact}", _size(r.size_bytes), f"{r.bits_per_weight:.2f}" if r.bits_per_weight else "",
            _num(r.load_s, 2), _num(r.tokens_per_s, 1), agreement,
            f"{100 * r.delta_vs_merged:+.1f} pts" if r.delta_vs_merged is not None else "",
            f"{100 * r.eos_stop_rate:.0f}%" if r.eos_stop_rate is not None else "", status + " |",
        ]))
    notes = [
        "",
        f"{meta['test_examples']} test prompts, agreement with the teacher's answers (bootstrap 95% CI over prompts); "
        f"tolerance {100 * meta['tolerance']:.1f} points. merged: transformers, batches of {meta['batch_size']}; "
        "gguf: llama.cpp, one request at a time (tok/s includes prompt processing).",
    ]
    for r in rows:
        if r.tensor_types and len(r.tensor_types) > 2:
            mix = ", ".join(f"{n} {t}" for t, n in sorted(r.tensor_types.items(), key=lambda kv: -kv[1]))
            notes.append(f"{r.artifact}: {r.bits_per_weight:.2f} bits/weight from its file size; tensors: {mix} "
                         "(k-quants fall back to legacy types where a row is not a multiple of 256).")
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
