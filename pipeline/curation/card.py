"""The dataset card: what went in, what each step removed and why, what came out."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import SPLITS
from pipeline.conversation import StudentView
from pipeline.curation.records import Removal

EXAMPLES_PER_REASON = 3


@dataclass
class StepRecord:
    """What one step that ran did, as the card shows it: examples in and out, every removal
    with its reason, and the examples it changed without removing them (PII scrubbing)."""

    name: str
    n_in: int
    n_out: int
    removed: list[Removal] = field(default_factory=list)
    changed: list[Removal] = field(default_factory=list)

    def by_reason(self) -> Counter:
        return Counter(r.reason for r in self.removed)


def removed_counts(steps: list[StepRecord]) -> dict[str, int]:
    """reason -> count of removed examples over all steps."""
    total: Counter = Counter()
    for step in steps:
        total.update(step.by_reason())
    return dict(sorted(total.items()))


def teacher_costs(raw: list[dict]) -> dict[str, tuple[int, float]]:
    """teacher -> (records, summed cost_usd) over the capture file."""
    costs: dict[str, tuple[int, float]] = {}
    for record in raw:
        meta = record.get("meta") or {}
        name = str(meta.get("teacher") or "(unknown)")
        n, usd = costs.get(name, (0, 0.0))
        cost = meta.get("cost_usd")
        costs[name] = (n + 1, usd + (float(cost) if isinstance(cost, (int, float)) else 0.0))
    return dict(sorted(costs.items()))


def plot_lengths(before: list[dict], after: list[dict], path: Path) -> None:
    """Prompt and answer token-length histograms, all normalised examples vs the kept ones.
    Uses the Agg canvas directly (no pyplot global state) and no metadata, so bytes are stable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    for ax, key, title in zip(fig.subplots(1, 2), ("prompt_tokens", "completion_tokens"), ("prompt", "answer")):
        all_lengths = [ex[key] for ex in before if key in ex]
        kept_lengths = [ex[key] for ex in after if key in ex]
        bins = _bins(all_lengths)
        ax.hist(all_lengths, bins=bins, color="#bbbbbb", label=f"after normalise ({len(all_lengths)})")
        ax.hist(kept_lengths, bins=bins, color="#3b7dd8", label=f"kept ({len(kept_lengths)})")
        ax.set_title(f"{title} length (student tokens)")
        ax.set_xlabel("tokens")
        ax.set_ylabel("examples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def _bins(lengths: list[int]) -> list[float]:
    top = max(lengths, default=1)
    width = max(1, -(-top // 40))  # about 40 integer-aligned bins
    return [b - 0.5 for b in range(0, top + width + 1, width)]


def render_card(
    *,
    task_name: str,
    raw: list[dict],
    steps: list[StepRecord],
    labels_before: Counter,
    splits: dict[str, list[dict]],
    pii_counts: Counter | None,
    figures: list[str],
    notes: list[str],
    view: StudentView,
) -> str:
    kept = sum(len(v) for v in splits.values())
    lines = [f"# Dataset card: {task_name}", "", f"{len(raw)} teacher records in, {kept} examples kept.", ""]
    lines += [f"> **Warning:** {note}" for note in notes] + ([""] if notes else [])
    lines += _student_input_section(view, splits)
    lines += _teachers_section(raw)
    lines += _steps_section(steps)
    if pii_counts is not None:
        lines += ["## PII replaced", "", "| type | replaced |", "|---|---|"]
        lines += [f"| {kind} | {pii_counts.get(kind, 0)} |" for kind in ("email", "phone", "card", "iban")] + [""]
    lines += _splits_section(splits)
    lines += _labels_section(labels_before, splits)
    lines += ["## Token lengths", ""] + [f"![{name}]({name})" for name in figures] + [""]
    lines += _length_stats(splits)
    lines += _removed_section(steps)
    return "\n".join(lines).rstrip() + "\n"


def _student_input_section(view: StudentView, splits: dict[str, list[dict]]) -> list[str]:
    """What the student reads, and why: the system prompt learned away is named in full."""
    examples = [ex for s in SPLITS for ex in splits[s]]
    history = sum(any(m["role"] == "assistant" for m in ex["messages"]) for ex in examples)
    lines = [
        "## Student input",
        "",
        f"The student reads: **{view.shape}** ({view.reason}).",
        "",
        f"{history} of {len(examples)} kept examples carry earlier turns (their loss is on the final answer only).",
    ]
    if view.shape == "user" and view.static_system_prompt:
        quoted = "\n".join(f"> {line}" for line in view.static_system_prompt.splitlines())
        lines += ["", "Learned away, the system prompt every record shares:", "", quoted]
    return lines + [""]


def _teachers_section(raw: list[dict]) -> list[str]:
    lines = ["## Teachers", "", "| teacher | records | cost (USD) |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {usd:.4f} |" for name, (n, usd) in teacher_costs(raw).items()]
    return lines + [""] + _batch_savings(raw)


def _batch_savings(raw: list[dict]) -> list[str]:
    """Answers bought as provider batches (teacher.mode=batch) against what sync calls would have cost."""
    metas = [r.get("meta") or {} for r in raw]
    batch = [m for m in metas if str(m.get("provenance") or "").startswith("batch:")]
    if not batch:
        return []
    paid = sum(float(m.get("cost_usd") or 0.0) for m in batch)
    sync = sum(float(m.get("sync_cost_usd") or 0.0) for m in batch)
    share = f" ({(sync - paid) / sync:.0%})" if sync else ""
    return [
        f"Batch capture: {len(batch)} answers came from provider batches at ${paid:.4f}; at sync prices "
        f"they would have cost ${sync:.4f}, saved ${sync - paid:.4f}{share}.",
        "",
    ]


def _steps_section(steps: list[StepRecord]) -> list[str]:
    lines = ["## Steps", "", "| # | step | in | out | removed (by reason) |", "|---|---|---|---|---|"]
    for i, step in enumerate(steps, start=1):
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(step.by_reason().items())) or "-"
        if step.changed:
            reasons += f" (changed {len(step.changed)})"
        lines.append(f"| {i} | {step.name} | {step.n_in} | {step.n_out} | {reasons} |")
    return lines + [""]


def _splits_section(splits: dict[str, list[dict]]) -> list[str]:
    return ["## Splits", "", "| split | examples |", "|---|---|", *[f"| {s} | {len(splits[s])} |" for s in SPLITS], ""]


def _labels_section(labels_before: Counter, splits: dict[str, list[dict]]) -> list[str]:
    per_split = {s: Counter(e["label"] for e in splits[s]) for s in SPLITS}
    lines = [
        "## Label distribution",
        "",
        "Before: the teacher's answers after normalisation. After: the kept splits.",
        "",
        "| label | before | train | validation | test | after |",
        "|---|---|---|---|---|---|",
    ]
    for label in sorted(set(labels_before) | set().union(*per_split.values())):
        after = sum(per_split[s][label] for s in SPLITS)
        row = [label or "(none)", labels_before.get(label, 0), *(per_split[s][label] for s in SPLITS), after]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return lines + [""]


def _length_stats(splits: dict[str, list[dict]]) -> list[str]:
    lines = ["| split | prompt tokens (min / median / max) | answer tokens (min / median / max) |", "|---|---|---|"]
    for s in SPLITS:
        lines.append(
            f"| {s} | {_stats([e['prompt_tokens'] for e in splits[s]])} | "
            f"{_stats([e['completion_tokens'] for e in splits[s]])} |"
        )
    return lines + [""]


def _stats(values: list[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[0]} / {ordered[len(ordered) // 2]} / {ordered[-1]}"


def _removed_section(steps: list[StepRecord]) -> list[str]:
    lines = [f"## Examples removed or changed (first {EXAMPLES_PER_REASON} per reason)", ""]
    for step in steps:
        shown: Counter = Counter()
        for r in step.removed + step.changed:
            if shown[r.reason] >= EXAMPLES_PER_REASON:
                continue
            shown[r.reason] += 1
            detail = f" ({_cell(r.detail, 100)})" if r.detail else ""
            lines.append(
                f"- **{step.name} / {r.reason}** `{r.id}`: `{_cell(r.prompt, 80)}` → `{_cell(r.answer, 40)}`{detail}"
            )
    if len(lines) == 2:
        lines.append("Nothing was removed or changed.")
    return lines + [""]


def _cell(text: str, width: int) -> str:
    text = text.replace("`", "'").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
