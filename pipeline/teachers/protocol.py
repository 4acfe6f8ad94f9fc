"""The `Teacher` protocol: what every provider (local, openai, anthropic) implements in full.

Used by the teacher service (service.py), which capture (`distill capture RECIPE`), the judge
and the router's teacher backend call; nobody else talks to a teacher directly. Because every
member exists on every provider, callers neither branch on provider names nor `getattr` with
a default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipeline.config import TeacherConfig
    from pipeline.llm.completion import Completion
    from pipeline.teachers.ledger import Price


@runtime_checkable
class Teacher(Protocol):
    spec: str  # "provider:model", as the recipe wrote it
    # True: answers are generated in this process, in batches, at no cost (complete_batch is the
    # fast path; no ledger, no retries). False: every answer is a network call, priced, driven
    # one by one through the dispatcher (concurrency, rate limits, retries, the budget).
    in_process: bool
    # US$ per token for network teachers; None when the recipe allows an unpriced one (recorded
    # as $0) and for in-process teachers, which cost nothing.
    price: Price | None
    # What a caller should record about this teacher's answers, appended as it learns them
    # (e.g. "the server refused logprobs; answers carry none").
    notes: list[str]
    # Request parameters `complete` can send as a client gave them (the proxy), in place of the
    # teacher's own max_new_tokens / temperature; empty for an in-process teacher.
    forwards: frozenset[str]

    @classmethod
    def from_config(
        cls, model: str, cfg: TeacherConfig, labels: list[str] | None = None, schema: dict | None = None
    ) -> Teacher:
        """Build from the part of the spec after `provider:` and the recipe's teacher section.
        `labels` are the task's label strings for a classification task, else None; `schema` an
        extraction task's output_schema, else None. Loads and connects nothing: that happens on
        the first call."""

    def identity(self) -> dict[str, Any]:
        """Provider, model and generation params: everything that changes the answer (the cache key).
        Never the API key."""

    async def complete(self, messages: list[dict], params: dict | None = None) -> Completion:
        """One answer. Network teachers raise TeacherCallError (maybe retryable) or TeacherAuthError.
        `params` (keys within `forwards`): sent as given instead of the teacher's own settings."""

    async def complete_batch(self, conversations: list[list[dict]]) -> list[Completion]:
        """One answer per conversation, in order. Unthrottled and unretried: the service adds those."""

    async def aclose(self) -> None:
        """Close connections bound to the running event loop. The teacher stays usable: the next
        call reconnects (so a caller running one event loop per batch closes after each)."""
