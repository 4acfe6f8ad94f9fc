"""report.md from report.json: the headline table with CIs first, then routing, cost,
per-label detail and calibration, with the PNGs embedded.

    .venv/bin/python -c "import json; from pipeline.evaluation.render import headline_rows; \
print(headline_rows(json.load(open('runs/latest/evaluate/report.json'))))"
"""

from __future__ import annotations

from pipeline.config import Recipe
from pipeline.evaluation import plots
from pipeline.task import Task


def _fig(report: dict, name: str, pct: bool = True) -> str:
    fig = report["figures"].get(name)
    if fig is None:
        return "—"
    if pct:
        return f"{100 * fig['value']:.1f}% [{100 * fig['lo']:.1f}, {100 * fig['hi']:.1f}]"
    return f"{fig['value']:.3f} [{fig['lo']:.3f}, {fig['hi']:.3f}]"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _usd(value: float) -> str:
    return f"${value:.4f}" if value < 1 else f"${value:.2f}"


def headline_rows(report: dict, prefix: str = "") -> list[str]:
    """system | agreement with teacher | macro-F1 vs teacher | gold accuracy | gold macro-F1
    (an extraction task: exact match and field F1, against the teacher and gold, and the
    schema-valid rate). prefix "file_": the same table on eval.file."""
    if report.get("task_kind") == "extraction":
        return extraction_rows(report, prefix)
    rows = [
        "| system | agreement with teacher | macro-F1 vs teacher | gold accuracy | gold macro-F1 |",
        "|---|---|---|---|---|",
    ]
    rows.append(
        f"| base student ({report['base_prompt']}) | {_fig(report, prefix + 'base_agreement')} | "
        f"{_fig(report, prefix + 'base_macro_f1', False)} | {_fig(report, prefix + 'base_accuracy')} | "
        f"{_fig(report, prefix + 'base_gold_macro_f1', False)} |"
    )
    rows.append(
        f"| tuned student (as served) | {_fig(report, prefix + 'tuned_agreement')} | "
        f"{_fig(report, prefix + 'tuned_macro_f1', False)} | {_fig(report, prefix + 'tuned_accuracy')} | "
        f"{_fig(report, prefix + 'tuned_gold_macro_f1', False)} |"
    )
    rows.append(
        f"| teacher (captured answers) | 100% (reference) | 1.000 (reference) | "
        f"{_fig(report, prefix + 'teacher_accuracy')} | {_fig(report, prefix + 'teacher_gold_macro_f1', False)} |"
    )
    rows.append(
        f"| routed at the threshold | {_fig(report, prefix + 'system_agreement')} | — | "
        f"{_fig(report, prefix + 'system_accuracy')} | — |"
    )
    return rows


def extraction_rows(report: dict, prefix: str = "") -> list[str]:
    def f(name: str, pct: bool = True) -> str:
        return _fig(report, prefix + name, pct)

    rows = [
        "| system | exact match vs teacher | field F1 vs teacher | exact match vs gold | field F1 vs gold "
        "| schema-valid |",
        "|---|---|---|---|---|---|",
    ]
    rows.append(
        f"| base student ({report['base_prompt']}) | {f('base_exact_match')} | {f('base_field_f1', False)} | "
        f"{f('base_gold_exact_match')} | {f('base_gold_field_f1', False)} | {f('base_schema_valid_rate')} |"
    )
    rows.append(
        f"| tuned student (as served) | {f('tuned_exact_match')} | {f('tuned_field_f1', False)} | "
        f"{f('tuned_gold_exact_match')} | {f('tuned_gold_field_f1', False)} | {f('tuned_schema_valid_rate')} |"
    )
    rows.append(
        f"| teacher (captured answers) | 100% (reference) | 1.000 (reference) | {f('teacher_gold_exact_match')} "
        f"| {f('teacher_gold_field_f1', False)} | {f('teacher_schema_valid_rate')} |"
    )
    rows.append(f"| routed at the threshold | {f('system_agreement')} | — | {f('system_accuracy')} | — | — |")
    return rows


def field_lines(report: dict) -> list[str]:
    """The per-field table (tuned student vs the teacher, and vs gold) and the fields most often wrong."""
    detail = report["detail"]
    table = detail.get("per_field")
    if not table:
        return []
    gold = (detail.get("per_field_gold") or {}).get("tuned") or {}
    lines = [
        "## Per field (tuned student, test)",
        "",
        'Precision and recall count present values (null, [] and "" are absent); accuracy counts every '
        "record, absent == absent included.",
        "",
        "| field | precision | recall | F1 | accuracy | wrong | support | F1 vs gold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in table.items():
        vs_gold = f"{gold[name]['f1']:.2f}" if name in gold else "—"
        lines.append(
            f"| `{name}` | {m['precision']:.2f} | {m['recall']:.2f} | {m['f1']:.2f} | {m['accuracy']:.2f} | "
            f"{m['wrong']} | {m['support']} | {vs_gold} |"
        )
    wrong = detail.get("most_often_wrong") or []
    if wrong:
        lines += ["", "Most often wrong: " + ", ".join(f"`{n}` ({table[n]['wrong']} records)" for n in wrong) + "."]
    return lines


def base_weight_lines(report: dict) -> list[str]:
    w = report.get("base_weights")
    if not w:
        return []
    line = (
        f"Base weights: the adapter was trained against the {w['trained_against']} base; "
        f"this evaluation answered on the {w['evaluated_on']} base, which export merges and the router serves."
    )
    if w["trained_against"].startswith("NF4"):
        line += " The GPU tier measures the difference (tests/gpu/test_gpu.py, NF4 vs bf16 base)."
    return [line, ""]


def routing_lines(report: dict) -> list[str]:
    r = report["router"]
    target, conf = r["quality_target"], r["confidence"]
    lines = ["## Routing threshold (chosen on validation, confirmed on test)", ""]
    if r["threshold"] is None:
        if r["reason"] == "too_few_examples":
            lines.append(
                f"**Too few calibration examples to support the target**: a {100 * conf:.0f}% lower bound "
                f"of {target} needs at least {r['examples_needed']} answered validation examples even if "
                f"every one agrees; validation has {r['examples']}. The router escalates every request."
            )
        else:
            lines.append(
                f"**No threshold meets the target**: on no confident subset of the {r['examples']} "
                f"validation answers does the {100 * conf:.0f}% Clopper-Pearson lower bound on agreement "
                f"reach {target} (even at 100% agreement that takes {r['examples_needed']} answered "
                "examples). The router escalates every request (fail closed)."
            )
        lines.append("")
    else:
        lines.append(
            f"Signal `{r['signal']}` ≥ {r['threshold']:.4g}: {r['answered']} of {r['examples']} "
            f"validation answers kept local, {r['agreeing']} agreeing; one-sided {100 * conf:.0f}% "
            f"Clopper-Pearson lower bound {r['bound']:.3f} ≥ target {target}."
        )
        lines.append("")
    exp, test = r["expected"], r["test"]
    lines += ["| figure | expected (validation) | confirmed (test) |", "|---|---|---|"]
    for name in ("local_share", "system_agreement", "system_accuracy"):
        if name in exp or name in test:

            def cell(d, name=name):
                f = d.get(name)
                return "—" if f is None else f"{100 * f['value']:.1f}% [{100 * f['lo']:.1f}, {100 * f['hi']:.1f}]"

            lines.append(f"| {name.replace('_', ' ')} | {cell(exp)} | {cell(test)} |")
    lines += [
        "",
        "Hard gates, escalated whatever the score: an answer cut off at max tokens"
        + ("; an answer that is not one of the labels" if r.get("labels") else "")
        + gate_text(r.get("gates") or {})
        + ".",
    ]
    if r["signal"] in ("label_prob", "label_margin"):
        lines.append(f"Label posterior temperature (fitted on validation): {r['temperature']:.3f}.")
    if r.get("field_temperatures"):
        temps = ", ".join(f"`{k}` {v:.2f}" for k, v in r["field_temperatures"].items())
        lines.append(
            f"Field temperatures (p = exp(logprob / T), fitted on validation; `*` pools every field): {temps}."
        )
    if r.get("fields"):
        lines.append(f"Agreement is on the fields {', '.join(r['fields'])} (router.fields), not the whole record.")
    if r["signal"] == "logistic":
        weights = ", ".join(f"{k} {v:+.3f}" for k, v in (r.get("weights") or {}).items())
        lines.append(f"Logistic weights ({weights}); threshold chosen on {r.get('chosen_on')}.")
    return lines


def gate_text(gates: dict) -> str:
    parts = []
    if gates.get("answer_regex"):
        parts.append(f"; not matching `{gates['answer_regex']}`")
    if gates.get("output_schema"):
        parts.append("; not JSON valid against the task's output_schema")
    if gates.get("refusal_patterns"):
        parts.append(f"; matching one of {len(gates['refusal_patterns'])} refusal patterns")
    return "".join(parts)


def cost_lines(report: dict) -> list[str]:
    c = report["cost"]
    basis = (
        "the capture ledger (tokens × price)"
        if c["teacher_basis"] == "ledger"
        else f"its measured latency × ${c['student_usd_per_hour']:.2f}/h (a local teacher bills nothing else)"
    )
    lines = [
        "## Cost per 1,000 requests",
        "",
        f"Teacher: {_usd(c['teacher_usd_per_request'] * 1000)} per 1,000 from {basis}. Student: measured "
        f"generation time on this machine × `eval.cost.student_usd_per_hour` = ${c['student_usd_per_hour']:.2f}/h "
        f"(default $0.10/h, a 2-vCPU cloud VM)"
        + (f", {c['student_requests_per_s']:.1f} requests/s batched." if c["student_requests_per_s"] else "."),
        "",
        "| system | $ per 1,000 | local share | saving vs teacher-only | agreement with teacher |",
        "|---|---|---|---|---|",
    ]
    quality = {
        "teacher only": "100%",
        "routed": _fig(report, "system_agreement"),
        "student only": _fig(report, "tuned_agreement"),
    }
    for row in c["rows"]:
        lines.append(
            f"| {row['system']} | {_usd(row['usd_per_1k'])} | {_pct(row['local_share'])} | "
            f"{_pct(row['saving_vs_teacher'])} | {quality[row['system']]} |"
        )
    lines += priced_as_lines(c.get("priced_as"))
    lines += ["", f"![cost-quality]({plots.COST_QUALITY_PNG})"]
    return lines


def priced_as_lines(api: dict | None) -> list[str]:
    """The same traffic priced as the API the recipe names (eval.cost.teacher_priced_as): not a bill."""
    if not api:
        return []
    saving = (
        f"{_pct(api['saving'])} [{_pct(api['saving_lo'])}, {_pct(api['saving_hi'])}]"
        if api["saving"] is not None
        else "—"
    )
    return [
        "",
        f"**Priced as {api['spec']}** (${api['input_per_mtok']:g} / ${api['output_per_mtok']:g} per 1M tokens "
        f"in/out, {api['price_source']}): the teacher's {api['prompt_tokens_per_request']:.0f} prompt "
        f"and {api['completion_tokens_per_request']:.1f} completion tokens per request ({api['tokens']}, "
        f"{api['requests']} captured requests) at that list price. What a user paying {api['spec']} for "
        "every request would pay, and what routing saves them; the range carries the local share's 95% CI.",
        "",
        "| system | $ per 1,000, priced as the API | saving vs the API |",
        "|---|---|---|",
        f"| {api['spec']} for every request | {_usd(api['teacher_usd_per_1k'])} | — |",
        f"| routed (student + escalations to {api['spec']}) | {_usd(api['routed_usd_per_1k'])} "
        f"[{_usd(api['routed_usd_per_1k_lo'])}, {_usd(api['routed_usd_per_1k_hi'])}] | {saving} |",
    ]


def detail_lines(report: dict) -> list[str]:
    per_label = report["detail"].get("per_label")
    if not per_label:
        return []
    lines = [
        "## Per label (tuned student vs teacher, test)",
        "",
        "| label | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for label, m in per_label.items():
        lines.append(
            f"| {label} | {m['precision']:.2f} | {m['recall']:.2f} | {m['f1-score']:.2f} | {int(m['support'])} |"
        )
    return lines + ["", f"![confusion matrix]({plots.CONFUSION_PNG})"]


def calibration_lines(report: dict) -> list[str]:
    cal = report["calibration"]
    lines = ["## Confidence signals (test)", "", '| signal | AUROC for "agrees with teacher" |', "|---|---|"]
    for name, s in cal["signals"].items():
        chosen = " (chosen)" if name == report["router"]["signal"] else ""
        auroc = "—" if s["auroc"] is None else f"{s['auroc']:.3f}"
        lines.append(f"| {name}{chosen} | {auroc} |")
    rel = cal["reliability"]
    ece = "—" if rel["ece"] is None else f"{rel['ece']:.3f}"
    lines += [
        "",
        f"Reliability of {rel['signal']}: expected calibration error {ece}.",
        "",
        f"![reliability]({plots.RELIABILITY_PNG}) ![risk-coverage]({plots.RISK_COVERAGE_PNG})",
    ]
    return lines


def all_figure_lines(report: dict) -> list[str]:
    """Every figure with its CI, machine names as in report.json and eval.gate."""
    lines = ["## All figures (test)", "", "| figure | value [95% CI] | n |", "|---|---|---|"]
    for name in sorted(report["figures"]):
        lines.append(f"| `{name}` | {_fig(report, name, 'f1' not in name)} | {report['figures'][name]['n']} |")
    return lines


def report_markdown(report: dict, recipe: Recipe, task: Task) -> str:
    n, nv = report["test_examples"], report["validation_examples"]
    lines = [
        f"# Evaluation: {recipe.name} ({task.name}, {task.kind})",
        "",
        f"{n} test and {nv} validation prompts. Brackets: 95% bootstrap CI over prompts "
        f"({report['bootstrap']['reps']} resamples, seed {report['bootstrap']['seed']}).",
        "",
    ]
    lines += headline_rows(report) + [""]
    lines += base_weight_lines(report)
    if report.get("heldout"):
        h = report["heldout"]
        lines += (
            [
                f"## On your held-out file ({h['file']}, {h['n']} prompts; teacher answers cost "
                f"{_usd(h['teacher_usd'])} this run)",
                "",
            ]
            + headline_rows(report, "file_")
            + [""]
        )
    lines += routing_lines(report) + [""]
    lines += cost_lines(report) + [""]
    lines += detail_lines(report) + [""]
    lines += field_lines(report) + [""]
    lines += calibration_lines(report) + [""]
    lines += all_figure_lines(report)
    return "\n".join(lines) + "\n"
