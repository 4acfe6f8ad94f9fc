"""The soak in small (`make test`; the full one is bench/bench_router_soak.py): 150 requests from 8
clients mixing valid, malformed, oversize, disconnecting and escalating ones against the router
in its own process, the fault server as teacher. No 5xx on a valid request, every refusal the
one expected, every escalation logged exactly once, the budget never passed. RSS is the bench's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_router_soak  # noqa: E402


def test_a_small_soak_keeps_every_promise(tmp_path):
    result = bench_router_soak.soak(150, 8, tmp_path, sample_rss=False, pool_size=192)
    assert result["verdicts"] == {
        "no_5xx_on_valid": True,
        "refusals_as_expected": True,
        "routes_as_chosen": True,
        "every_escalation_logged_once": True,
        "budget_never_exceeded": True,
    }, result
    kinds = result["by_kind"]
    assert set(kinds) == {"valid", "escalating", "malformed", "oversize", "disconnect"}, kinds
    assert result["escalations_answered_by_teacher"] > 0 and result["log_records"] > 0
