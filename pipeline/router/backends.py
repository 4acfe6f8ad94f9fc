"""What answers a request: the student (a local model folder) and the teacher (TeacherService).

The student backend answers the messages it is given: the router hands it the client's
conversation in the shape the student was trained on (`student_messages`, the policy's
student_input). Each student says how long a prompt is in its own tokens (`prompt_tokens`,
checked against serve.max_prompt_tokens before a request is queued), and stops computing an
answer whose every caller has gone (a deadline, a client that hung up): the next request never
waits behind work nobody will read. The teacher backend answers the conversation as the client
sent it, after the task's instructions and worked examples when the client sent no system prompt
(`Task.teacher_messages`, what capture sends), through the same TeacherService capture uses, so
the router shares its cache, price table, ledger (budget reserved before each call), retries and
circuit breaker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.errors import DistillError
from pipeline.llm.answer import Serving, answer_as_served
from pipeline.llm.completion import Completion
from pipeline.llm.content_text import ContentNotVerbatim, content_pieces, prompt_token_ids
from pipeline.llm.structured import field_logprobs, gbnf
from pipeline.router.errors import BackendUnavailable, InvalidRequest
from pipeline.router.protocol import TokenLogprob, TopLogprob
from pipeline.teachers.errors import TeacherFatalError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from pipeline.config import TeacherConfig
    from pipeline.task import Task
    from pipeline.teachers.protocol import Teacher
    from pipeline.teachers.service import TeacherService

log = logging.getLogger(__name__)


class Backend(Protocol):
    """A student. `top_logprobs` None: the client asked for no token logprobs; k >= 0: return a
    TokenCompletion whose tokens carry the k likeliest alternatives (at most max_top_logprobs;
    None there: this backend returns no per-token detail, so the app refuses `logprobs`)."""

    @property
    def max_top_logprobs(self) -> int | None: ...  # read only, so a backend's int (or None) class constant meets it

    async def complete(
        self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int | None = None
    ) -> Completion: ...

    async def prompt_tokens(self, messages: list[dict[str, str]]) -> int | None:
        """The prompt's length in this student's tokens, chat template included (None: this
        backend cannot tell; its server bounds it). Raises InvalidRequest for a conversation the
        student cannot take (its template refuses it)."""


class GenerationAbandoned(Exception):
    """Every caller of a running generate call has gone: it stops at the next forward pass."""


@dataclass
class Callers:
    """Whether anyone still waits for a generate call's answers; read by the generate thread."""

    gone: bool = False

    @classmethod
    def watching(cls, futures: list[asyncio.Future]) -> Callers:
        callers = cls()

        def check(_: asyncio.Future) -> None:
            callers.gone = all(f.cancelled() for f in futures)

        for future in futures:
            future.add_done_callback(check)
        return callers


@dataclass
class TokenCompletion(Completion):
    """A Completion with each answer token's text, bytes and top alternatives: what a client
    that asked for `logprobs` gets. The policy reads the plain Completion fields, as ever."""

    tokens: list[TokenLogprob] = field(default_factory=list)


class StudentBackend:
    """The exported student, loaded once from `model_dir` with pipeline.llm.

    Micro-batching: requests that arrive while a generate call runs (or within `window_s`
    of the first one) share the next call, up to `max_batch`, grouped by max_tokens; a lone
    request on an idle server waits for nobody (window 0, the default). Greedy decoding with
    left padding gives each request what a batch of one would (tests/router/test_router_escalation.py).

    `score_labels`: the policy's labels, passed to generate_batch so it fills
    `Completion.label_logprobs` when the policy's signal needs them. `schema`: the policy's JSON
    Schema, decoded under (every answer parses and validates; `Completion.field_logprobs` filled).

    Token logprobs asked for: each token's own log-prob is generate's (the number the policy
    read); its top alternatives come from one teacher-forced pass over prompt + answer, run
    only for requests that ask for them.

    One bad member never fails its batch: a batch whose generate call raises is answered again
    member by member, so only the request that caused it fails. A generate call whose every
    caller has gone raises GenerationAbandoned at its next forward pass (a hook on the model and
    on each decoder layer), releasing the model for the requests still waiting."""

    max_top_logprobs = 20  # OpenAI's ceiling

    def __init__(
        self,
        model_dir: Path,
        score_labels: list[str] | None = None,
        max_batch: int = 8,
        window_s: float = 0.0,
        decode: str = "generate",
        schema: dict | None = None,
    ):
        from pipeline.llm.loading import device_plan, load_model, load_tokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(str(self.model_dir))
        # Prompts are measured with a tokenizer of their own: generate() sets the other's padding
        # side while it runs, and a Rust tokenizer shared across threads can refuse a call.
        self._counter = load_tokenizer(str(self.model_dir))
        self._count_lock = threading.Lock()
        self.model = load_model(str(self.model_dir), device_plan())
        self.model.eval()
        self._callers: Callers | None = None  # of the generate call running now
        self.abandoned = 0  # generate calls stopped because every caller had gone
        for module in [self.model, *getattr(self.model.get_decoder(), "layers", [])]:
            module.register_forward_pre_hook(self._stop_if_abandoned)
        self.max_batch = max_batch
        self.window_s = window_s
        self._serving = Serving(decode, tuple(score_labels) if score_labels else None, schema=schema)
        # generate() mutates the tokenizer (padding side) and shares the model's caches:
        # one generate call at a time on this model.
        self._lock = threading.Lock()
        # Created on the serving loop by its first request; a new loop (a restarted app, a test's
        # next server) gets its own, since asyncio queues and tasks belong to one loop. The worker
        # runs only while requests are queued, so a backend no one holds any more (a registry
        # version the router swapped out) leaves no task behind and is freed with its model.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # size of each generate call, for tests and the bench
        self.ready = True
        log.info("student loaded from %s (micro-batches up to %d)", self.model_dir, max_batch)

    async def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return await asyncio.to_thread(self._count, messages)

    def _count(self, messages: list[dict[str, str]]) -> int:
        from jinja2 import TemplateError

        with self._count_lock:
            try:
                # Typing quirk, ignored: transformers types the result as a union; tokenize=False gives a str.
                prompt: str = self._counter.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[assignment]
                return len(prompt_token_ids(self._counter, [messages], [prompt])[0])
            except (TemplateError, ContentNotVerbatim) as err:
                raise InvalidRequest(f"the student cannot take this conversation: {err}", param="messages") from None

    async def complete(
        self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int | None = None
    ) -> Completion:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._queue, self._worker = loop, asyncio.Queue(), None
        future = loop.create_future()
        assert self._queue is not None  # made for this loop above, or on its first request
        self._queue.put_nowait((messages, max_tokens, top_logprobs, future))
        # One event loop: the worker either has returned (done) or will see this request before it returns.
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._batch_while_queued())
        return await future

    async def _batch_while_queued(self) -> None:
        assert self._queue is not None  # complete() makes it before it starts the worker
        while not self._queue.empty():
            batch = await self._collect()
            for max_tokens in dict.fromkeys(mt for _, mt, _, _ in batch):
                # done: the caller gave up (deadline, client gone); its slot goes to no one
                group = [(m, top, f) for m, mt, top, f in batch if mt == max_tokens and not f.done()]
                if group:
                    await self._run(group, max_tokens)

    async def _collect(self) -> list[tuple]:
        """The first waiting request, then whoever else is queued or arrives within the window."""
        assert self._queue is not None  # complete() makes it before it starts the worker
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        until = loop.time() + self.window_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = until - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    async def _run(self, group: list[tuple], max_tokens: int) -> None:
        # Generation is seconds of CPU/GPU work; off the event loop, so /health and other
        # requests keep being answered meanwhile.
        futures = [future for _, _, future in group]
        try:
            completions = await asyncio.to_thread(
                self._generate, [(m, top) for m, top, _ in group], max_tokens, Callers.watching(futures)
            )
        except GenerationAbandoned:
            self.abandoned += 1
            return
        except Exception as err:  # noqa: BLE001 - handed to the caller it belongs to, not swallowed
            waiting = [member for member in group if not member[2].done()]
            if len(group) == 1 or not waiting:
                for future in futures:
                    if not future.done():
                        future.set_exception(err)
                return
            # Which member broke the batch is unknown: each is answered alone, so only it fails.
            log.warning(
                "a micro-batch of %d failed (%s); answering its members one by one", len(group), type(err).__name__
            )
            for member in waiting:
                await self._run([member], max_tokens)
            return
        for future, completion in zip(futures, completions, strict=True):
            if not future.done():
                future.set_result(completion)

    def _generate(
        self, asks: list[tuple[list[dict[str, str]], int | None]], max_tokens: int, callers: Callers
    ) -> list[Completion]:
        serving = replace(self._serving, max_new_tokens=max_tokens, batch_size=len(asks))
        with self._lock:
            self._callers = callers
            try:
                self.batches.append(len(asks))
                completions = answer_as_served(self.model, self.tokenizer, [m for m, _ in asks], serving)
                return [c if top is None else self._with_tokens(m, c, top) for (m, top), c in zip(asks, completions)]
            finally:
                self._callers = None

    def _stop_if_abandoned(self, module, args) -> None:
        callers = self._callers
        if callers is not None and callers.gone:
            raise GenerationAbandoned()

    def _with_tokens(self, messages: list[dict[str, str]], answer: Completion, top: int) -> TokenCompletion:
        ids = answer.token_ids or []
        alternatives = self._top_alternatives(messages, ids, top) if top and ids else [[] for _ in ids]
        tokens = [
            TokenLogprob(token=text, logprob=lp, bytes=raw, top_logprobs=alts)
            for (text, raw), lp, alts in zip(map(self._token_text, ids), answer.token_logprobs or [], alternatives)
        ]
        return TokenCompletion(**vars(answer), tokens=tokens)

    def _top_alternatives(self, messages: list[dict[str, str]], ids: list[int], top: int) -> list[list[TopLogprob]]:
        """The `top` likeliest tokens at each answer position: one forward pass over prompt + answer,
        the prompt tokenized as generate_batch tokenizes it."""
        import torch

        # Typing quirk, ignored: transformers types the result as a union; tokenize=False gives a str.
        prompt: str = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[assignment]
        (prompt_ids,) = prompt_token_ids(self.tokenizer, [messages], [prompt])
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([prompt_ids + ids], device=self.model.device)).logits
        # Position i predicts token i+1: the answer's tokens are predicted from len(prompt)-1 on.
        rows = torch.log_softmax(logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(ids)].float(), dim=-1)
        values, indices = rows.topk(top, dim=-1)
        return [
            [
                TopLogprob(token=text, logprob=v, bytes=raw)
                for (text, raw), v in zip(map(self._token_text, row_ids), row_values)
            ]
            for row_ids, row_values in zip(indices.tolist(), values.tolist())
        ]

    def _token_text(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and its exact bytes (byte-level BPE vocabularies spell bytes as characters)."""
        # Typing quirk, ignored: transformers types decode's result as str | list[str]; one id list gives a str.
        text: str = self.tokenizer.decode([token_id])  # type: ignore[assignment]
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(raw, str) and all(ch in _UNICODE_TO_BYTE for ch in raw):
            return text, [_UNICODE_TO_BYTE[ch] for ch in raw]
        return text, list(text.encode("utf-8"))


class GgufBackend:
    """The GGUF export in llama.cpp, in process (`serve.student=llama.cpp`), prompted as the
    export's parity check prompts it (pipeline/llm/gguf_runtime.py GgufModel: the file's own chat
    template and BOS rule). Greedy decoding, one token at a time, so each token's log-prob and
    top alternatives are read off its logits row: the policy's confidence signal works as on
    the transformers student. One llama.cpp context: one request at a time.

    `schema`: the policy's JSON Schema, enforced by llama.cpp's own grammar engine (converted to
    GBNF, structured.gbnf), as a llama.cpp server would; each token's log-prob is then read off
    the row the grammar left, like transformers' constrained scores, and the fields' confidence
    (`Completion.field_logprobs`) from the answer's pieces."""

    max_top_logprobs = 20

    def __init__(self, path: Path, n_ctx: int = 2048, schema: dict | None = None):
        from pipeline.llm.gguf_runtime import GgufModel

        self.path = Path(path)
        self.gguf = GgufModel(self.path, n_ctx=n_ctx)
        self.schema = schema
        self._gbnf = gbnf(schema) if schema is not None else None
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.ready = True
        log.info("student loaded from %s (llama.cpp)", self.path)

    async def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        def count() -> int:
            with self._count_lock:
                return len(self._prompt_ids(messages))

        return await asyncio.to_thread(count)

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The rendered prompt's ids, message content tokenized as text (content_text.py): a content
        that llama.cpp reads differently with control tokens parsed holds one."""
        llm = self.gguf.llm

        def ids(text: str, special: bool, bos: bool = False) -> list[int]:
            return llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

        if all(ids(m["content"], True) == ids(m["content"], False) for m in messages):
            return self.gguf.tokenize(self.gguf.render(messages) or "")
        try:
            pieces = content_pieces(lambda m: self.gguf.render(m) or "", messages)
        except ContentNotVerbatim as err:
            raise InvalidRequest(f"the student cannot take this conversation: {err}", param="messages") from None
        return [t for n, (text, is_content) in enumerate(pieces) for t in ids(text, not is_content, bos=n == 0)]

    async def complete(
        self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int | None = None
    ) -> Completion:
        callers = Callers()
        try:
            return await asyncio.to_thread(self._answer, messages, max_tokens, top_logprobs, callers)
        except asyncio.CancelledError:
            callers.gone = True  # the decoding loop stops at its next token
            raise

    def _answer(self, messages: list[dict[str, str]], max_tokens: int, top: int | None, callers: Callers) -> Completion:
        import time

        start = time.perf_counter()
        with self._lock:
            prompt = self._prompt_ids(messages)
            ids, logprobs, rows, finish = self._decode(prompt, max_tokens, top or 0, callers)
            llm = self.gguf.llm
            text = llm.detokenize(ids, special=False).decode("utf-8", errors="replace").strip()
            pieces = [llm.detokenize([t], prev_tokens=ids[:i]) for i, t in enumerate(ids)]
            fields = (
                field_logprobs([p.decode("utf-8", errors="replace") for p in pieces], logprobs[: len(ids)])
                if self.schema is not None
                else None
            )
            answer = Completion(
                text=text,
                source="gguf",
                prompt_tokens=len(prompt),
                completion_tokens=len(ids),
                token_ids=ids,
                token_logprobs=logprobs,
                finish_reason=finish,
                latency_ms=int((time.perf_counter() - start) * 1000),
                field_logprobs=fields,
            )
            if top is None:
                return answer
            tokens = [
                TokenLogprob(
                    token=p.decode("utf-8", errors="replace"),
                    logprob=lp,
                    bytes=list(p),
                    top_logprobs=[self._alternative(int(i), float(v), ids[:n]) for i, v in row],
                )
                for n, (p, lp, row) in enumerate(zip(pieces, logprobs, rows))
            ]
        return TokenCompletion(**vars(answer), tokens=tokens)

    def _decode(self, prompt: list[int], max_tokens: int, top: int, callers: Callers):
        """Greedy tokens, their log-probs (of the EOS when the answer is empty, as generate_batch
        records it), per token the `top` (id, log-prob) alternatives, and the finish reason."""
        import numpy as np

        llm = self.gguf.llm
        llm.reset()
        llm.eval(prompt)
        ids: list[int] = []
        logprobs: list[float] = []
        rows: list[list[tuple[int, float]]] = []  # per token: (id, log-prob) of the `top` likeliest
        grammar = self.gguf.grammar(self._gbnf) if self._gbnf is not None else None
        try:
            while True:
                if callers.gone:
                    raise GenerationAbandoned()
                row = self.gguf.next_logprobs()
                if grammar is not None:
                    row = grammar.constrain(row)
                token = int(np.argmax(row))
                if self.gguf.is_eog(token):
                    logprobs = logprobs or [float(row[token])]
                    return ids, logprobs, rows, "stop"
                ids.append(token)
                logprobs.append(float(row[token]))
                best: Iterable[int] = np.argpartition(-row, top)[:top] if top else []
                rows.append(sorted(((i, row[i]) for i in best), key=lambda pair: -pair[1]))
                if len(ids) >= max_tokens:
                    return ids, logprobs, rows, "length"
                if grammar is not None:
                    grammar.accept(token)
                llm.eval([token])
        finally:
            if grammar is not None:
                grammar.close()

    def _alternative(self, token_id: int, logprob: float, before: list[int]) -> TopLogprob:
        piece = self.gguf.llm.detokenize([token_id], prev_tokens=before)
        return TopLogprob(token=piece.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(piece))


class UpstreamBackend:
    """A student served by any OpenAI-compatible server (`serve.student=openai:<model>`: `vllm
    serve ./merged`, Ollama, llama.cpp's server), so the router stays a thin stateless layer in
    front of it. Spec, key and errors go through the teacher machinery (registry spec parsing,
    keys.resolve_api_key, openai_compat's request params and error translation, keys scrubbed);
    the call itself is made here, because a student call carries the request's own max_tokens
    and top_logprobs and its tokens come back to the client. Token logprobs are always asked
    for: they are the policy's confidence signal (an upstream that sends none escalates all).
    `schema`: the policy's JSON Schema, asked for as strict structured output (response_format
    json_schema), as the router's teacher is; the fields' confidence is read off the tokens."""

    max_top_logprobs = 20

    def __init__(self, cfg: TeacherConfig, schema: dict | None = None):
        from pipeline.teachers.keys import resolve_api_key
        from pipeline.teachers.openai_compat import OpenAITeacher
        from pipeline.teachers.registry import parse_spec

        provider, self.model = parse_spec(cfg.spec)
        if provider != "openai":
            raise DistillError(
                f"serve.student={cfg.spec}: an upstream student is openai:<model> (any "
                "OpenAI-compatible server, at serve.student_base_url)"
            )
        self.spec, self.base_url, self.timeout_s = cfg.spec, cfg.base_url, cfg.timeout_s
        self._api_key = resolve_api_key(cfg.spec, cfg, OpenAITeacher.KEY_ENV)  # kept off repr and logs
        self._client: tuple[asyncio.AbstractEventLoop, AsyncOpenAI] | None = None
        self._warned = False
        self.schema = schema
        self.ready = True

    def __repr__(self) -> str:
        from pipeline.teachers.keys import public_url

        return f"UpstreamBackend({self.spec!r}, base_url={public_url(self.base_url)!r})"

    def _get_client(self):
        """One client per event loop: its connection pool belongs to the loop that opened it."""
        from openai import AsyncOpenAI

        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            self._client = (
                loop,
                AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0),
            )
        return self._client[1]

    async def prompt_tokens(self, messages: list[dict[str, str]]) -> None:
        return None  # its tokenizer is the upstream server's, which bounds the prompt itself

    async def complete(
        self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int | None = None
    ) -> Completion:
        import time

        import openai

        from pipeline.teachers.openai_compat import request_params, schema_format, translate_error

        params = request_params(self.model, max_tokens, 0.0, logprobs=True)
        if top_logprobs:
            params["top_logprobs"] = top_logprobs
        if self.schema is not None:
            params["response_format"] = schema_format(self.schema, "json_schema")
        start = time.perf_counter()
        try:
            response = await self._get_client().chat.completions.create(model=self.model, messages=messages, **params)
        except openai.OpenAIError as err:
            raise BackendUnavailable(f"student {self.spec}: {translate_error(err, self._api_key, self.spec)}") from None
        return self._to_completion(response, int((time.perf_counter() - start) * 1000), top_logprobs is not None)

    def _to_completion(self, response, latency_ms: int, with_tokens: bool) -> Completion:
        if not response.choices:
            raise BackendUnavailable(f"student {self.spec}: the upstream answered with no choices")
        choice, usage = response.choices[0], response.usage
        content = choice.logprobs.content if choice.logprobs is not None and choice.logprobs.content else []
        if not content and not self._warned:
            self._warned = True
            log.warning(
                "student %s sends no token logprobs: the policy has no confidence to read and escalates every request",
                self.spec,
            )
        answer = Completion(
            text=(choice.message.content or "").strip(),
            source=self.spec,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            token_logprobs=[t.logprob for t in content] or None,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            latency_ms=latency_ms,
            field_logprobs=field_logprobs([t.token for t in content], [t.logprob for t in content])
            if self.schema is not None and content
            else None,
        )
        if not with_tokens:
            return answer
        tokens = [
            TokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=t.bytes,
                top_logprobs=[
                    TopLogprob(token=a.token, logprob=a.logprob, bytes=a.bytes) for a in t.top_logprobs or []
                ],
            )
            for t in content
        ]
        return TokenCompletion(**vars(answer), tokens=tokens)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client[1].close()
            self._client = None


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (used by Llama 3, Qwen, SmolLM...): character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


_UNICODE_TO_BYTE = _byte_level_alphabet()


class TeacherBackend:
    """The recipe's teacher, asked with the task's teacher prompt; never raises for a failed call.

    The TeacherService is built by `start()`, on the server's event-loop thread: its SQLite
    cache connection belongs to the thread that opened it. An answer found in the cache costs
    serving nothing; `ledger_path` (serve.ledger) keeps the spend across restarts."""

    def __init__(
        self,
        cfg: TeacherConfig,
        task: Task,
        cache_path: Path | str,
        budget_usd: float | None = None,
        ledger_path: Path | None = None,
        teacher: Teacher | None = None,
    ):
        """`budget_usd` (serve.budget_usd) replaces teacher.budget_usd: what serving may spend.
        `teacher`: one built already (the logs teacher, wiring.build_teacher); None: the one
        `cfg.spec` names, built by the service."""
        self.cfg = cfg if budget_usd is None else cfg.model_copy(update={"budget_usd": budget_usd})
        self.task = task
        self.cache_path = cache_path
        self.ledger_path = ledger_path
        self.teacher = teacher
        self.service: TeacherService | None = None

    @property
    def spec(self) -> str:
        return self.cfg.spec

    @property
    def source(self) -> str:
        """Where its answers come from, as the reply's `distill.source` says: the spec's provider
        (`logs`: a dataset's answers standing in for a teacher, a simulation)."""
        return self.cfg.spec.partition(":")[0]

    @property
    def spent_usd(self) -> float:
        """Spent on teacher calls, by this process and (with a ledger file) before it."""
        ledger = self.service.ledger if self.service is not None else None
        return ledger.total_usd if ledger is not None else 0.0

    def estimated_cost(self, conversation: list[dict[str, str]], completion_tokens: int) -> float:
        """What the teacher would have charged to answer `conversation` at that length (0 when
        unpriced): the saving when the student answered instead."""
        from pipeline.teachers.ledger import prompt_tokens_estimate

        price = self.service.price if self.service is not None else None
        if price is None:
            return 0.0
        messages = self.task.teacher_messages(conversation, few_shot=self.cfg.few_shot)
        return price.cost(prompt_tokens_estimate(messages), max(completion_tokens, 1))

    def start(self) -> None:
        from pipeline.teachers.cache import TeacherCache
        from pipeline.teachers.service import TeacherService

        if self.service is not None:
            return
        if self.teacher is None:
            self.service = TeacherService.for_task(
                self.cfg, self.cache_path, self.task, ledger_path=self.ledger_path, charge_cached=False
            )
        else:
            self.service = TeacherService(
                self.teacher,
                self.cfg,
                TeacherCache(Path(self.cache_path)),
                ledger_path=self.ledger_path,
                charge_cached=False,
            )

    async def answer(self, conversation: list[dict[str, str]], timeout_s: float) -> Completion:
        """The teacher's answer to the client's `conversation`, or a Completion with `error` set:
        failed after its retries, over budget, past `timeout_s`, or refused (auth, circuit open)."""
        self.start()
        assert self.service is not None  # start() made it
        messages = self.task.teacher_messages(conversation, few_shot=self.cfg.few_shot)
        try:
            async with asyncio.timeout(max(timeout_s, 0.001)):
                (completion,) = await self.service.answer([messages])
        except TimeoutError:
            return self._failed(f"deadline: no teacher answer within {timeout_s:.2f} s")
        except TeacherFatalError as err:
            # A bad key or an open circuit: every request would fail the same way, so say it
            # loudly, and keep serving the student.
            log.error("teacher %s refused: %s", self.spec, err)
            return self._failed(f"{type(err).__name__}: {err}")
        return completion

    def _failed(self, error: str) -> Completion:
        return Completion(text="", source=self.spec, error=error, finish_reason="error")

    async def aclose(self) -> None:
        if self.service is not None:
            await self.service.aclose()
