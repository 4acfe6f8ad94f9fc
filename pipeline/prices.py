"""List prices of the APIs a teacher may be, in US$ per 1M tokens (pipeline/prices.yaml).

    distill validate RECIPE eval.cost.teacher_priced_as=openai:gpt-4o-mini

Read by the teacher ledger (what a call costs, the budget) and by evaluation's cost table
(`eval.cost.teacher_priced_as`: what the captured teacher traffic would cost at that API's price).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from importlib import resources

import yaml

_SNAPSHOT = re.compile(r"-(\d{4}-?\d{2}-?\d{2}|latest)$")


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float
    source: str  # "prices.yaml" or "recipe": said in the manifest so a stale price is traceable

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


def load_price_table() -> dict:
    text = resources.files("pipeline").joinpath("prices.yaml").read_text()
    return yaml.safe_load(text) or {}


def lookup_price(provider: str, model: str, table: dict) -> Price | None:
    """Exact name, else the name without a date/-latest suffix (gpt-4o-2024-08-06 -> gpt-4o)."""
    entry = table_entry(provider, model, table)
    return None if entry is None else Price(float(entry["input"]), float(entry["output"]), "prices.yaml")


def table_entry(provider: str, model: str, table: dict) -> dict | None:
    models = table.get(provider) or {}
    if not isinstance(models, dict):
        return None
    for name in (model, _SNAPSHOT.sub("", model)):
        if name in models:
            return models[name]
    return None


def priced_as(spec: str) -> Price | None:
    """`provider:model` from the table, or None when the table has no such entry."""
    provider, _, model = spec.partition(":")
    return lookup_price(provider, model, load_price_table())


def nearest_specs(spec: str, n: int = 3) -> list[str]:
    """The table's `provider:model` names closest to `spec`, for the error that refuses it."""
    table = load_price_table()
    known = [f"{p}:{m}" for p, models in table.items() if isinstance(models, dict) for m in models]
    return difflib.get_close_matches(spec, known, n=n, cutoff=0.5)
