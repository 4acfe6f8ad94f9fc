"""Gather a round's data: the previous round's records plus the router's new escalations.

Every escalation record already holds the teacher's answer (the router paid for it once) and the
whole conversation the client sent, so nothing is asked again. A new prompt is one whose
normalised conversation is in none of: the previous
round's records, an earlier round's escalated slice, the frozen test split, or an escalation
already taken this round; so importing a file twice, or again next round, adds nothing.
A stable hash of the prompt holds `holdout` of the new prompts back as the escalated slice,
which never trains and on which the candidate and the champion are compared.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.conversation import read_messages, split_answer
from pipeline.curation.records import normalize_text
from pipeline.errors import DistillError
from pipeline.teachers.sources import read_rows

ROUTER_SOURCE = "router"


@dataclass
class Gathered:
    pool: list[dict]  # training records of this round: the previous round's plus the new ones
    slice: list[dict]  # new escalations held back for the comparison
    added: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # why an escalation added nothing

    def summary(self) -> dict:
        return {
            "pool": len(self.pool),
            "added": len(self.added),
            "escalated_slice": len(self.slice),
            "skipped": dict(sorted(self.skipped.items())),
            "added_by_label": _count(self.added, lambda r: r["messages"][-1]["content"]),
            "added_by_reason": _count(self.added + self.slice, reason_kind),
        }


def prompt_key(record: dict) -> str:
    """Every turn before the answer, normalised: the same request whatever file it comes from."""
    return "\n".join(f"{m['role']}: {normalize_text(m['content'])}" for m in record["messages"][:-1]).lower()


def in_slice(key: str, holdout: float) -> bool:
    """Deterministic in every process (no Python hash()): the first 8 bytes of the key's sha256."""
    return _unit_hash(key) < holdout


def replayed(key: str, share: float) -> bool:
    """Is this previous record kept at replay `share`? Salted, so it is not the slice's hash again."""
    return share >= 1 or _unit_hash("replay\n" + key) < share


def _unit_hash(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 16**16


@dataclass(frozen=True)
class Mix:
    """How a round's pool mixes old and new: the share of the previous pool replayed, and how many
    times each new escalation counts (`meta.weight`, which finetune oversamples by)."""

    replay: float = 1.0
    weight: int = 1


def gather(
    previous: list[dict],
    escalation_files: list[Path],
    excluded: set[str],
    holdout: float,
    round_no: int,
    mix: Mix = Mix(),
) -> Gathered:
    """`excluded`: prompt keys that may not train (frozen test, earlier escalated slices). A previous
    record left out by `mix.replay` still counts as known: an escalation of it adds nothing."""
    known = {prompt_key(r) for r in previous}
    ids = {r["id"] for r in previous}
    out = Gathered(pool=[r for r in previous if replayed(prompt_key(r), mix.replay)], slice=[])
    for path in escalation_files:
        for where, row in read_rows(path):
            record = _check_escalation(where, row)
            key = prompt_key(record)
            if key in known or key in excluded:
                out.skipped["test_or_slice" if key in excluded else "already_known"] += 1
                continue
            if record["meta"].get("error") or not record["messages"][-1]["content"].strip():
                out.skipped["no_answer"] += 1
                continue
            known.add(key)
            record = _as_round_record(record, ids, round_no, mix.weight)
            if in_slice(key, holdout):
                out.slice.append(record)
            else:
                out.added.append(record)
                out.pool.append(record)
    return out


def _check_escalation(where: str, row: dict) -> dict:
    try:
        messages = read_messages(row.get("messages"))
        split_answer(messages)
    except ValueError as err:
        raise DistillError(
            f"{where}: not an escalation record ({err}; want messages [..., user, assistant]: "
            "the router's serve.escalations file has this shape)"
        ) from None
    return {"id": str(row.get("id") or ""), "messages": messages, "meta": dict(row.get("meta") or {})}


def _as_round_record(record: dict, ids: set[str], round_no: int, weight: int) -> dict:
    """A unique id (router request ids may repeat across files), the round it joined in, its weight."""
    base = record["id"] or f"esc-{hashlib.sha256(prompt_key(record).encode()).hexdigest()[:12]}"
    rid, n = base, 1
    while rid in ids:
        n += 1
        rid = f"{base}~{n}"
    ids.add(rid)
    meta = {**record["meta"], "round": round_no, **({"weight": weight} if weight > 1 else {})}
    return {**record, "id": rid, "meta": meta}


def reason_kind(record: dict) -> str:
    """The router's reason without its numbers ("label_prob 0.41 < threshold 0.82" -> "label_prob < threshold")."""
    reason = record["meta"].get("reason") or "unknown"
    return re.sub(r"\s+", " ", re.sub(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", "", reason)).strip()


def _count(records: list[dict], key) -> dict[str, int]:
    return dict(sorted(Counter(key(r) for r in records).items()))
