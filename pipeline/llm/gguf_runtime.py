"""The GGUF runtime: every in-process llama.cpp load of the pipeline goes through `GgufModel`.

    .venv/bin/pytest -q tests/export/test_export_gguf.py

Used by export's parity check and by the router's `serve.student=llama.cpp` backend. Before a
file is loaded in this process it is decoded once in a child process (`probe`): a llama.cpp
build whose CPU kernels crash on this machine (llama.cpp compiled with AMX kernels crashes on
quantized weights on some AMX Xeon VMs) then costs a one-line error naming the file, its type
and the fix, not the whole process. `make setup` compiles llama-cpp-python without AMX
(Makefile, LLAMA_CFLAGS), so the probe is the safety net for builds made elsewhere.
"""

from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import DistillError
from pipeline.llm.completion import Completion

PROBE_TIMEOUT_S = 120
# Loads the file and decodes two tokens: the code path the crash above takes on the first decode.
PROBE = """
import sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, verbose=False)
bos = llm.token_bos()
llm.eval([bos if bos >= 0 else 0, 1])
"""


class GgufUnusable(DistillError):
    """This llama.cpp build cannot decode this GGUF on this machine (said in one line)."""


def quiet_llama_cpp() -> None:
    """llama-cpp-python routes llama.cpp's C logging through this logger, but its level table
    is one off from today's ggml enum (INFO arrives as WARNING, WARN as ERROR), and the per-tensor
    lines (metadata dumps, one k-quant fallback warning per tensor) would bury the stage's output.
    Only CRITICAL passes: failures surface as return codes we check, fallbacks in the parity table."""
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)


def probe(path: Path) -> None:
    """Raise GgufUnusable when decoding `path` kills or fails a child process. Each file version
    (path, size, mtime) is probed once per process."""
    stat = Path(path).stat()
    problem = _probe_once(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if problem:
        raise GgufUnusable(problem)


@functools.lru_cache(maxsize=64)
def _probe_once(path: str, size: int, mtime_ns: int) -> str | None:
    del size, mtime_ns  # part of the cache key only: a rewritten file is probed again
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, path], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not decode {Path(path).name} within {PROBE_TIMEOUT_S} s in a probe process"
    return probe_verdict(Path(path), done.returncode, done.stderr)


def probe_verdict(path: Path, returncode: int, stderr: str) -> str | None:
    """None when the probe decoded; else one line saying what happened and what to do."""
    if returncode == 0:
        return None
    if returncode < 0:
        try:
            how = signal.Signals(-returncode).name
        except ValueError:
            how = f"signal {-returncode}"
        return (
            f"llama.cpp crashed ({how}) decoding {path.name} in a probe process: the installed "
            f"llama-cpp-python cannot run this file's weight types on this CPU (a build with AMX kernels "
            f"does this on AMX Xeons); reinstall it with `make setup`, which compiles it without AMX"
        )
    last = (stderr or "").strip().splitlines()[-1:] or [f"exit code {returncode}"]
    return f"llama.cpp could not load or decode {path.name} ({last[0][:200]})"


def gpu_layers() -> int:
    """-1 (every layer) when the installed llama.cpp was built with a GPU backend that found a device, else 0."""
    import llama_cpp

    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


class GgufModel:
    """A GGUF file loaded in llama.cpp, prompted exactly as a llama.cpp server prompts it:
    the chat template read from the file, rendered by llama-cpp-python's formatter, tokenized
    by llama.cpp with the model's own BOS rule, decoded greedily until an end-of-generation token."""

    def __init__(self, path: Path, n_ctx: int, n_gpu_layers: int | None = None):
        """`n_gpu_layers`: None offloads every layer to the GPU when this llama.cpp build can (a CUDA
        build on a machine with a GPU: a 7B's parity run in minutes instead of hours), else none."""
        import llama_cpp

        probe(path)
        start = time.perf_counter()
        self.path = Path(path)
        self.n_gpu_layers = gpu_layers() if n_gpu_layers is None else n_gpu_layers
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=self.n_gpu_layers, verbose=False)
        quiet_llama_cpp()  # after: Llama(verbose=False) resets the logger's level
        self.load_s = time.perf_counter() - start
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.template = self.llm.metadata.get("tokenizer.chat_template")

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token: EOS, <|im_end|>, <|eot_id|>, ..."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def render(self, messages: list[dict]) -> str | None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self.template is None:
            return None
        llm = self.llm
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        formatter = Jinja2ChatFormatter(template=self.template, eos_token=eos, bos_token=bos)
        # Typing quirk, ignored: llama_cpp types messages as its per-role TypedDicts; ours are plain dicts of that shape.
        return formatter(messages=messages).prompt  # type: ignore[arg-type]

    def tokenize(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def next_logprobs(self):
        """log-softmax (float64 numpy) of the next-token distribution after what was evaluated."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        row = logits.astype(np.float64)
        return row - np.logaddexp.reduce(row)

    def grammar(self, gbnf: str) -> GrammarConstraint:
        """llama.cpp's grammar engine over this model's vocabulary, for one answer."""
        return GrammarConstraint(self, gbnf)

    def answer(self, prompt_ids: list[int], max_new_tokens: int, gbnf: str | None = None) -> Completion:
        """Greedy answer with each chosen token's log-probability (the EOS's when the answer is empty);
        with `gbnf`, decoded under that llama.cpp grammar (log-probabilities over what it allows),
        the fields' log-probabilities read off the answer's pieces."""
        from pipeline.llm.structured import field_logprobs

        start = time.perf_counter()
        llm = self.llm
        llm.reset()
        llm.eval(prompt_ids)
        tokens: list[int] = []
        logprobs: list[float] = []
        finish = "length"
        grammar = self.grammar(gbnf) if gbnf is not None else None
        try:
            while len(tokens) < max_new_tokens:
                row = self.next_logprobs() if grammar is None else grammar.constrain(self.next_logprobs())
                token = int(row.argmax())
                if self.is_eog(token):
                    logprobs = logprobs or [float(row[token])]
                    finish = "stop"
                    break
                tokens.append(token)
                logprobs.append(float(row[token]))
                if grammar is not None:
                    grammar.accept(token)
                llm.eval([token])
        finally:
            if grammar is not None:
                grammar.close()
        text = llm.detokenize(tokens, special=False).decode("utf-8", errors="replace").strip()
        fields = None
        if gbnf is not None:
            pieces = [
                llm.detokenize([t], prev_tokens=tokens[:i]).decode("utf-8", errors="replace")
                for i, t in enumerate(tokens)
            ]
            fields = field_logprobs(pieces, logprobs[: len(tokens)])
        return Completion(
            text=text,
            source="gguf",
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(tokens),
            token_ids=tokens,
            token_logprobs=logprobs,
            finish_reason=finish,
            latency_ms=int((time.perf_counter() - start) * 1000),
            field_logprobs=fields,
        )

    def forced_logprobs(self, prompt_ids: list[int], answer_ids: list[int]):
        """Teacher-forced: the next-token log-softmax rows at each answer position and the one after
        it (shape [len(answer_ids) + 1, vocab]), the rows `pipeline.export.merged.answer_logprobs`
        gives in transformers."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(prompt_ids)
        rows = [self.next_logprobs()]
        for token in answer_ids:
            self.llm.eval([token])
            rows.append(self.next_logprobs())
        return np.stack(rows)

    def answer_all(
        self, conversations: list[list[dict]], max_new_tokens: int, gbnf: str | None = None
    ) -> tuple[list[Completion], float]:
        """Greedy answers to each conversation (under the `gbnf` grammar when given), and the seconds they took."""
        start = time.perf_counter()
        completions = [self.answer(self.tokenize(self.render(c) or ""), max_new_tokens, gbnf) for c in conversations]
        return completions, time.perf_counter() - start

    def close(self) -> None:
        self.llm.close()


class GrammarConstraint:
    """One answer's llama.cpp grammar sampler (`llama_sampler_init_grammar`), applied to the
    log-probability rows of a greedy loop: `constrain` masks what the grammar forbids and
    renormalises over the rest, `accept` advances it by the chosen token."""

    def __init__(self, model: GgufModel, gbnf: str):
        import llama_cpp
        from llama_cpp._internals import LlamaTokenDataArray

        self._llama_cpp = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(model._vocab, gbnf.encode("utf-8"), b"root")
        if not self._sampler:
            raise DistillError("llama.cpp could not parse the grammar converted from the task's output_schema")
        self._data = LlamaTokenDataArray(n_vocab=model.llm.n_vocab())

    def constrain(self, row):
        import ctypes

        import numpy as np

        self._data.copy_logits(row.astype(np.single))
        self._llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._data.candidates))
        masked = np.full(row.shape, -np.inf)
        kept = self._data.candidates_data[: self._data.candidates.size]
        allowed = kept.id[np.isfinite(kept.logit)]
        masked[allowed] = row[allowed]
        return masked - np.logaddexp.reduce(masked[allowed])

    def accept(self, token: int) -> None:
        self._llama_cpp.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        if self._sampler:
            self._llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
