"""The pairwise judge: verdict parsing and order-swap arithmetic, then the real path against
llama.cpp's OpenAI-compatible server on loopback (real HTTP), through the teacher service."""

from pipeline.evaluation.judge import judge_figures, outcome, pairwise, parse_verdict


def test_verdicts_and_the_order_swap_cancel_position_bias():
    assert [parse_verdict(t) for t in ("A", " b.", "Tie", "Answer A is better", "both")] == ["A", "B", "tie", "A", None]
    assert outcome("A", "B") == "win"  # student preferred in both positions
    assert outcome("B", "A") == "loss"
    assert outcome("A", "A") == "tie"  # the judge only preferred the first position
    assert outcome("A", "tie") == "win" and outcome(None, None) == "tie"
    figs = judge_figures(["win", "tie", "loss", "win"], [("A", "B"), ("A", "A"), ("B", "A"), ("A", "tie")], 100, 0)
    assert figs["judge_win_rate"].value == 0.5 and figs["judge_not_worse_rate"].value == 0.75
    assert figs["judge_consistency"].value == 0.5


def test_judge_through_llama_cpp_asks_both_orders(tmp_path):
    from support.capture_helpers import llama_server

    from pipeline.config import TeacherConfig
    from pipeline.teachers.service import TeacherService

    with llama_server(tmp_path / "server.log") as base_url:
        cfg = TeacherConfig(
            spec="openai:smollm2-135m-instruct",
            base_url=base_url,
            max_new_tokens=3,
            concurrency=1,
            timeout_s=120,
            price={"input_per_mtok": 0.1, "output_per_mtok": 0.4},
        )
        service = TeacherService.from_config(cfg, tmp_path / "cache.sqlite")
        try:
            outcomes, verdicts = pairwise(
                service, ["Say hello.", "Name a colour."], ["Hello!", "Blue."], ["Hi there.", "The sky."]
            )
            report = service.report
        finally:
            service.close()
    assert len(outcomes) == 2 and set(outcomes) <= {"win", "tie", "loss"}
    assert report.calls == 4 and report.failed == 0  # 2 pairs x 2 orders, every one a real HTTP call
    assert report.spent_usd > 0  # costed by the same ledger as capture
    assert all(v in (None, "A", "B", "tie") for pair in verdicts for v in pair)
