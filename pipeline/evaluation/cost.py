"""$ per 1,000 requests: teacher-only, routed at the chosen threshold, and student-only.

    .venv/bin/pytest -q tests/test_evaluate_metrics.py -k cost

Teacher: the mean cost of the captured answers (the ledger's tokens x price, kept on each
record as meta.cost_usd). A local in-process teacher is billed nothing by anyone, so it is
priced like the student: its measured latency x the machine's price. Student: measured
generation wall time on this hardware x `eval.cost.student_usd_per_hour`. A routed request
always pays the student (it answers first) and pays the teacher too when it escalates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    return [CostRow("teacher only", teacher_1k, 0.0, 0.0 if teacher_1k else None),
            CostRow("routed", routed_1k, local_share, saving(routed_1k)),
            CostRow("student only", student_1k, 1.0, saving(student_1k))]


def rows_json(rows: list[CostRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def cost_figures(records: list[dict], student_wall_s: float, requests: int, usd_per_hour: float,
                 local_share: float, curve: list[dict]) -> dict:
    """The report's cost section: prices, the three rows, and the cost-quality curve over thresholds."""
    teacher = teacher_price(records, usd_per_hour)
    student = student_price(student_wall_s, requests, usd_per_hour)
    rows = cost_rows(teacher.usd_per_request, student, local_share)
    # From "escalate everything" (coverage 0: the student runs, then the teacher) to every threshold.
    points = [(1000 * (student + teacher.usd_per_request), 1.0)]
    points += [(1000 * (student + (1 - r["coverage"]) * teacher.usd_per_request), r["system_agreement"])
               for r in curve]
    return {"teacher_usd_per_request": teacher.usd_per_request, "teacher_basis": teacher.basis,
            "student_usd_per_request": student, "student_usd_per_hour": usd_per_hour,
            "student_requests_per_s": requests / student_wall_s if student_wall_s else None,
            "rows": rows_json(rows), "curve": points}
