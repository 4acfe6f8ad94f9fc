"""$ per 1,000 requests: teacher-only, routed at the chosen threshold, and student-only.

    .venv/bin/pytest -q tests/evaluation/test_evaluate_metrics.py -k cost

Teacher: the mean cost of the captured answers (the ledger's tokens x price, kept on each
record as meta.cost_usd). A local in-process teacher is billed nothing by anyone, so it is
priced like the student: its measured latency x the machine's price. Student: measured
generation wall time on this hardware x `eval.cost.student_usd_per_hour`. A routed request
always pays the student (it answers first) and pays the teacher too when it escalates.

`eval.cost.teacher_priced_as` adds the test split's traffic priced as a paid API (`api_price_figures`):
what a user who pays that API for every request would pay, and what routing saves them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from pipeline.config import EvalCostConfig
from pipeline.conversation import conversation_of
from pipeline.prices import Price
from pipeline.stats import Figure


@dataclass(frozen=True)
class TeacherPrice:
    usd_per_request: float
    basis: str  # "ledger" (tokens x price) | "latency" (local teacher, machine price x time)
    requests: int


def teacher_price(records: list[dict], usd_per_hour: float) -> TeacherPrice:
    """What one teacher answer costs, from the capture records' meta."""
    metas = [r.get("meta") or {} for r in records if not (r.get("meta") or {}).get("error")]
    if not metas:
        return TeacherPrice(0.0, "ledger", 0)
    paid = sum(float(m.get("cost_usd") or 0.0) for m in metas)
    if paid > 0:
        return TeacherPrice(paid / len(metas), "ledger", len(metas))
    seconds = sum(float(m.get("latency_ms") or 0) for m in metas) / 1000
    return TeacherPrice(seconds / len(metas) * usd_per_hour / 3600, "latency", len(metas))


def student_price(wall_s: float, requests: int, usd_per_hour: float) -> float:
    """US$ per request from measured (batched) generation time on this machine."""
    return wall_s / max(requests, 1) * usd_per_hour / 3600


@dataclass(frozen=True)
class CostRow:
    system: str
    usd_per_1k: float
    local_share: float
    saving_vs_teacher: float | None  # share of the teacher-only cost saved


def cost_rows(teacher_usd: float, student_usd: float, local_share: float) -> list[CostRow]:
    teacher_1k = 1000 * teacher_usd
    routed_1k = 1000 * (student_usd + (1 - local_share) * teacher_usd)
    student_1k = 1000 * student_usd

    def saving(x: float) -> float | None:
        return None if teacher_1k == 0 else 1 - x / teacher_1k

    return [
        CostRow("teacher only", teacher_1k, 0.0, 0.0 if teacher_1k else None),
        CostRow("routed", routed_1k, local_share, saving(routed_1k)),
        CostRow("student only", student_1k, 1.0, saving(student_1k)),
    ]


def rows_json(rows: list[CostRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def cost_figures(
    records: list[dict],
    student_wall_s: float,
    requests: int,
    usd_per_hour: float,
    local_share: float,
    curve: list[dict],
) -> dict:
    """The report's cost section: prices, the three rows, and the cost-quality curve over thresholds."""
    teacher = teacher_price(records, usd_per_hour)
    student = student_price(student_wall_s, requests, usd_per_hour)
    rows = cost_rows(teacher.usd_per_request, student, local_share)
    # From "escalate everything" (coverage 0: the student runs, then the teacher) to every threshold.
    points = [(1000 * (student + teacher.usd_per_request), 1.0)]
    points += [(1000 * (student + (1 - r["coverage"]) * teacher.usd_per_request), r["system_agreement"]) for r in curve]
    return {
        "teacher_usd_per_request": teacher.usd_per_request,
        "teacher_basis": teacher.basis,
        "student_usd_per_request": student,
        "student_usd_per_hour": usd_per_hour,
        "student_requests_per_s": requests / student_wall_s if student_wall_s else None,
        "rows": rows_json(rows),
        "curve": points,
    }


def api_price_figures(
    records: list[dict],
    spec: str,
    price: Price,
    student_usd: float,
    local_share: float,
    local_lo: float,
    local_hi: float,
    count_tokens: Callable[[dict], tuple[int, int]] | None = None,
) -> dict | None:
    """The captured teacher traffic priced as the API `spec`: each answered request's prompt and
    completion tokens at `price`, and what routing saves against it, with the local share's CI carried
    into the saving's range. Tokens are the teacher's own count (meta.usage) where it recorded one, else
    `count_tokens(record)` (the student's tokenizer: imported logs carry no usage). None when neither."""
    answered = [r for r in records if not (r.get("meta") or {}).get("error")]
    counts, sources = [], set()
    for record in answered:
        usage = (record.get("meta") or {}).get("usage") or {}
        if usage.get("prompt_tokens") is not None and usage.get("completion_tokens") is not None:
            counts.append((usage["prompt_tokens"], usage["completion_tokens"]))
            sources.add("recorded by the teacher")
        elif count_tokens is not None:
            counts.append(count_tokens(record))
            sources.add("counted with the student's tokenizer")
    if not counts:
        return None
    prompt = sum(p for p, _ in counts) / len(counts)
    completion = sum(c for _, c in counts) / len(counts)
    teacher = price.cost(prompt, completion)

    def routed(share: float) -> float:
        return 1000 * (student_usd + (1 - share) * teacher)

    teacher_1k = 1000 * teacher

    def saving(usd: float) -> float | None:
        return None if teacher_1k == 0 else 1 - usd / teacher_1k

    return {
        "spec": spec,
        "input_per_mtok": price.input_per_mtok,
        "output_per_mtok": price.output_per_mtok,
        "price_source": price.source,
        "requests": len(counts),
        "tokens": " and ".join(sorted(sources)),
        "prompt_tokens_per_request": prompt,
        "completion_tokens_per_request": completion,
        "teacher_usd_per_1k": teacher_1k,
        "routed_usd_per_1k": routed(local_share),
        "routed_usd_per_1k_lo": routed(local_hi),
        "routed_usd_per_1k_hi": routed(local_lo),
        "saving": saving(routed(local_share)),
        "saving_lo": saving(routed(local_lo)),
        "saving_hi": saving(routed(local_hi)),
    }


def test_traffic(test: list[dict], records: list[dict]) -> list[dict]:
    """The test split as teacher records: the traffic the local share was measured on, so the API
    price and the routed cost describe the same requests, and a loop's rounds, judged on one frozen
    test split, are priced on the same requests (not on each round's training pool). Each keeps the
    teacher's own token count (meta.usage) where the capture holds its id."""
    usage = {r.get("id"): (r.get("meta") or {}).get("usage") for r in records}
    return [
        {
            "id": ex["id"],
            "messages": [*conversation_of(ex), {"role": "assistant", "content": ex["completion"]}],
            "meta": {"usage": usage[ex["id"]]} if usage.get(ex["id"]) else {},
        }
        for ex in test
    ]


def priced_as_api(
    cfg: EvalCostConfig,
    test: list[dict],
    records: list[dict],
    student_usd: float,
    local_share: Figure,
    count_tokens: Callable[[dict], tuple[int, int]] | None = None,
) -> dict | None:
    """`eval.cost.teacher_priced_as`'s figures for the test traffic, or None when the recipe names no API."""
    price = cfg.api_price()
    if cfg.teacher_priced_as is None or price is None:
        return None
    return api_price_figures(
        test_traffic(test, records),
        cfg.teacher_priced_as,
        price,
        student_usd,
        local_share.value,
        local_share.lo,
        local_share.hi,
        count_tokens,
    )
