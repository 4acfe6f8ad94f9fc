"""Prices, per-call cost and the budget.

    distill capture RECIPE teacher.budget_usd=5

Prices come from pipeline/prices.yaml (pipeline/prices.py), or the recipe's `teacher.price`. The budget
is enforced by reservation: before a call is sent, its worst-case cost (every prompt byte a
token, every allowed output token used) is reserved; if that would cross the budget, the
call is not sent. After the call the reservation is swapped for the real cost from usage.
A provider batch (teacher.mode=batch) is priced at the table's batch rate (`resolve_batch_price`)
and reserves the worst case of all its requests at once, before it is submitted.
An attempt whose outcome is unknown (timed out, body cut off, connection reset after the
request went out) is charged its whole reservation: the provider bills a generation that
finished on its side, and a retry needs a reservation of its own. So the total can never
exceed the budget, whatever the concurrency or the faults.

A ledger with a `store` file (the router's `serve.ledger`) starts from the spend recorded there
and rewrites it at every reservation and charge, counting reservations still in flight as spent:
a server killed mid-call restarts owing what it may have been billed, so a budget holds across
restarts. The record is fixed-width, rewritten in place by one pwrite (tens of microseconds on the
event loop, where a temp file and a rename cost milliseconds per call): a process that dies
leaves either the old record or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipeline.errors import DistillError
from pipeline.net import is_loopback_url
from pipeline.prices import Price, load_price_table, lookup_price, table_entry
from pipeline.teachers.keys import public_url

log = logging.getLogger(__name__)

# Chat templates add a few tokens per turn (role markers, separators); 8 covers the common ones.
TOKENS_PER_MESSAGE = 8


def resolve_batch_price(provider: str, model: str, sync: Price | None) -> Price | None:
    """The provider's batch rate for this model: the table's batch_input/batch_output when it
    lists them, else its batch_discount (both providers: half) of the sync price."""
    if sync is None:
        return None
    table = load_price_table()
    entry = table_entry(provider, model, table) or {}
    if sync.source == "prices.yaml" and "batch_input" in entry and "batch_output" in entry:
        return Price(float(entry["batch_input"]), float(entry["batch_output"]), "prices.yaml batch rate")
    discount = float(table.get("batch_discount", 0.5))
    return Price(
        sync.input_per_mtok * discount, sync.output_per_mtok * discount, f"batch rate: {discount:.0%} of {sync.source}"
    )


def resolve_price(provider: str, model: str, cfg) -> Price | None:
    """The recipe's price, else the table's, else $0 for a loopback server; None only when the
    recipe allows an unpriced teacher."""
    if cfg.price is not None:
        return Price(cfg.price.input_per_mtok, cfg.price.output_per_mtok, "recipe")
    price = lookup_price(provider, model, load_price_table())
    if price is not None:
        return price
    if cfg.base_url and is_loopback_url(cfg.base_url):
        # A server on this machine (llama.cpp, vLLM, Ollama) bills nobody: $0, said once.
        log.info(
            "teacher %s:%s on %s: self-hosted, priced at $0 (set teacher.price to charge it)",
            provider,
            model,
            public_url(cfg.base_url),
        )
        return Price(0.0, 0.0, "self-hosted loopback server")
    if cfg.budget_usd is not None:
        raise DistillError(
            f"teacher.budget_usd needs a price for {provider}:{model}, which is not in pipeline/prices.yaml; "
            "set teacher.price.input_per_mtok and teacher.price.output_per_mtok"
        )
    if not cfg.allow_unpriced:
        raise DistillError(
            f"no price known for {provider}:{model}; set teacher.price.input_per_mtok and "
            "teacher.price.output_per_mtok, or teacher.allow_unpriced=true to record usage at $0"
        )
    return None


def prompt_tokens_upper_bound(messages: list[dict]) -> int:
    """No byte-level tokenizer makes more tokens than bytes, so this bound is safe for any model."""
    return sum(len(m["content"].encode("utf-8")) + TOKENS_PER_MESSAGE for m in messages)


def prompt_tokens_estimate(messages: list[dict]) -> int:
    """~4 characters a token in English: what rate limits are counted against (as providers do)."""
    return sum(len(m["content"]) // 4 + TOKENS_PER_MESSAGE for m in messages)


class Ledger:
    """Running spend of one teacher service, against an optional budget covering every prompt
    it is asked (for capture: the whole prompt set).

    `prior_usd` is what the cached answers among those prompts cost when they were bought, so
    rerunning with the same budget buys nothing more and a higher budget resumes. `store`: a
    file keeping the spend across processes (module docstring); what it holds is prior spend."""

    def __init__(
        self, price: Price | None, budget_usd: float | None, prior_usd: float = 0.0, store: Path | None = None
    ):
        self.price = price
        self.budget_usd = budget_usd
        self.store = Path(store) if store is not None else None
        self.stored_usd = read_stored_spend(self.store) if self.store is not None else 0.0
        self.prior_usd = prior_usd + self.stored_usd
        self.spent_usd = 0.0
        self.reserved_usd = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._store_failed = False
        self._store_fd: int | None = None

    def count_cached(self, cost_usd: float) -> None:
        """An answer found in the cache: paid on an earlier run, but still inside the budget."""
        self.prior_usd += cost_usd

    @property
    def total_usd(self) -> float:
        return self.prior_usd + self.spent_usd

    def max_call_cost(self, messages: list[dict], max_new_tokens: int) -> float:
        if self.price is None:
            return 0.0
        return self.price.cost(prompt_tokens_upper_bound(messages), max_new_tokens)

    def reserve(self, amount: float) -> bool:
        """Hold `amount` for a call about to be sent; False when it could cross the budget."""
        if self.budget_usd is not None and self.total_usd + self.reserved_usd + amount > self.budget_usd:
            return False
        self.reserved_usd += amount
        self._save()
        return True

    def charge_reserved(self, reserved: float) -> float:
        """An attempt that may have been billed but gave no usage: charge the worst case held for it."""
        self.reserved_usd -= reserved
        self.spent_usd += reserved
        self._save()
        return reserved

    def settle(self, reserved: float, usage: dict[str, int] | None) -> float:
        """Release a reservation and charge the call's real cost. A successful call without
        usage is charged its reservation: we cannot know it cost less."""
        self.reserved_usd -= reserved
        if usage is None:
            return 0.0
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        cost = self.price.cost(prompt, completion) if self.price else 0.0
        if not usage:
            cost = reserved
        self.spent_usd += cost
        self._save()
        return cost

    def close(self) -> None:
        if self._store_fd is not None:
            os.close(self._store_fd)
            self._store_fd = None

    def _save(self) -> None:
        """What this ledger owes, reservations in flight included, written over the store."""
        if self.store is None:
            return
        owed = self.stored_usd + self.spent_usd + self.reserved_usd
        record = json.dumps({"spent_usd": owed}).ljust(STORE_WIDTH - 1).encode() + b"\n"
        try:
            if self._store_fd is None:
                self._store_fd = os.open(self.store, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._store_fd, record, 0)
        except OSError as err:
            if not self._store_failed:  # once: the budget still holds in this process
                self._store_failed = True
                log.error(
                    "cannot write the ledger %s (%s): spend since is not kept across a restart",
                    self.store,
                    err.strerror,
                )


STORE_WIDTH = 64  # bytes of a ledger record, padded: every rewrite covers the whole of the last one


def read_stored_spend(path: Path) -> float:
    """The spend a ledger store holds (0 when it does not exist yet)."""
    try:
        data = json.loads(path.read_text())
        spent = float(data["spent_usd"])
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return 0.0
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DistillError(
            f"{path}: not a ledger this router wrote ({type(err).__name__}); fix or delete it "
            "(deleting it forgets what was spent)"
        ) from None
    if not spent >= 0:
        raise DistillError(f"{path}: spent_usd={spent} is not a spend; fix or delete it")
    return spent
