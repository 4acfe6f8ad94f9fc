"""What evaluate writes: predictions.jsonl, router_policy.json (read by `distill serve`),
report.json / report.md, the four PNGs, and what of it goes to MLflow."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import EVAL_POLICY, EVAL_REPORT, atomic_write_json, atomic_write_text, write_jsonl
from pipeline.config import Recipe
from pipeline.conversation import StudentView, conversation_of
from pipeline.evaluation import plots
from pipeline.evaluation.render import report_markdown
from pipeline.evaluation.threshold import Choice
from pipeline.llm.policy import Policy
from pipeline.task import Task, agrees

PREDICTIONS = "predictions.jsonl"
REPORT_MD = "report.md"


def prediction_rows(task: Task, result: dict) -> list[dict]:
    policy: Policy = result["choice"].policy
    judged = result.get("judge", {}).get("outcomes") or [None] * len(result["test"])
    rows = []
    for ex, b, t, verdict in zip(result["test"], result["base"], result["tuned"], judged):
        gold = ex.get("gold") or None
        decision = policy.decide(t)
        rows.append(
            {
                "id": ex["id"],
                "messages": conversation_of(ex),
                "teacher": ex["completion"],
                "gold": gold,
                "base": b.text,
                "tuned": t.text,
                "tuned_confidence": decision.score,
                "route": decision.route,
                "route_reason": decision.reason,
                "tuned_mean_logprob": t.mean_logprob,
                "tuned_label_logprobs": t.label_logprobs,
                **({"tuned_field_logprobs": t.field_logprobs} if t.field_logprobs else {}),
                "base_agrees": agrees(task, b.text, ex["completion"]),
                "tuned_agrees": agrees(task, t.text, ex["completion"]),
                "teacher_correct": agrees(task, ex["completion"], gold) if gold else None,
                "tuned_correct": agrees(task, t.text, gold) if gold else None,
                "tuned_stopped": t.stopped,
                **({"judge": verdict} if verdict else {}),
            }
        )
    return rows


def policy_file(recipe: Recipe, result: dict, adapter_sha: str) -> dict:
    """router_policy.json: what the server loads (Policy.from_json) plus the evidence and the
    settings it was calibrated under; `adapter_sha256` ties it to one trained adapter."""
    choice: Choice = result["choice"]
    view: StudentView = result["view"]
    return {
        **choice.policy.to_json(),
        **choice.to_json(),
        "confidence": recipe.eval.confidence,
        "chosen_on": result["chosen_on"],
        "expected": {k: f.to_json() for k, f in result["expected"].items()},
        "test": {k: f.to_json() for k, f in result["confirmed"].items()},
        "student_input_resolved": view.to_json(),
        "settings": {
            "max_new_tokens": recipe.eval.max_new_tokens,
            "prompt_form": f"student_messages, {view.shape} ({view.reason})",
            "decoding": "greedy" if recipe.router.decode == "generate" else recipe.router.decode,
            "temperature": choice.policy.temperature,
            "label_scoring": bool(choice.policy.labels),
            "structured": choice.policy.schema is not None,
        },
        "adapter_sha256": adapter_sha,
    }


def write_outputs(out: Path, recipe: Recipe, task: Task, result: dict, adapter_sha: str) -> None:
    router = policy_file(recipe, result, adapter_sha)
    write_pngs(out, recipe, result)
    report = {
        "metrics": result["flat"],
        "figures": {k: f.to_json() for k, f in result["figures"].items()},
        "detail": result["detail"],
        "router": router,
        "calibration": result["signals"],
        "cost": result["cost"],
        "test_examples": len(result["test"]),
        "validation_examples": len(result["validation"]),
        "base_prompt": recipe.eval.base_prompt,
        "bootstrap": {"reps": recipe.eval.bootstrap, "seed": recipe.eval.seed},
        "plots": sorted(p.name for p in out.glob("*.png")),
        "task_kind": task.kind,
        "heldout": result.get("heldout"),
        "base_weights": result.get("base_weights"),
    }
    write_jsonl(out / PREDICTIONS, prediction_rows(task, result))
    atomic_write_json(out / EVAL_POLICY, router)
    atomic_write_json(out / EVAL_REPORT, report)
    atomic_write_text(out / REPORT_MD, report_markdown(report, recipe, task))


def write_pngs(out: Path, recipe: Recipe, result: dict) -> None:
    detail, signals, money = result["detail"], result["signals"], result["cost"]
    if "confusion" in detail:
        plots.confusion_png(
            out / plots.CONFUSION_PNG,
            detail["confusion"]["labels"],
            detail["confusion"]["matrix"],
            "tuned student vs teacher (test)",
        )
    rel = signals["reliability"]
    plots.reliability_png(out / plots.RELIABILITY_PNG, rel["bins"], rel["signal"], rel["ece"])
    confirmed, on_test = result["confirmed"], result["on_test"]
    chosen_risk = (on_test.coverage, 1 - on_test.agreement_answered) if on_test.answered else None
    plots.risk_coverage_png(
        out / plots.RISK_COVERAGE_PNG,
        {k: v["curve"] for k, v in signals["signals"].items()},
        chosen_risk,
        recipe.router.quality_target,
    )
    routed = money["rows"][1]
    plots.cost_quality_png(
        out / plots.COST_QUALITY_PNG,
        money["curve"],
        (routed["usd_per_1k"], confirmed["system_agreement"].value),
        (money["rows"][0]["usd_per_1k"], 1.0),
    )


def log_outputs(tracker, out: Path, flat: dict) -> None:
    tracker.metrics({k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for path in (out / REPORT_MD, out / EVAL_REPORT, out / EVAL_POLICY, out / PREDICTIONS, *sorted(out.glob("*.png"))):
        tracker.artifact(path)
