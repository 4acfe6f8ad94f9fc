"""The model card: README.md in the export folder, what a user of the artifacts reads first.

    distill export RECIPE        (writes runs/<recipe>/export/README.md)

Base, recipe, a summary of the dataset card, the evaluation headline with its CIs (from the
evaluate stage's report.json), the parity table, how to run each artifact, intended use and
limits. Everything in it is read from artifacts of this run; nothing is typed in by hand.
"""

from __future__ import annotations

from pipeline.export.parity import ArtifactParity

DATASET_SECTIONS = ("Splits", "Steps")


def dataset_summary(card_md: str | None) -> list[str]:
    """The sections of curate's card.md that say what the student was trained on."""
    if not card_md:
        return ["(no dataset card)"]
    out, keep = [], False
    for line in card_md.splitlines():
        if line.startswith("## "):
            keep = line[3:].strip() in DATASET_SECTIONS
            line = "#" + line  # one level down inside this card
        if keep:
            out.append(line)
    return out or ["(the dataset card has no Splits/Steps section)"]


def evaluation_headline(report: dict | None) -> list[str]:
    """Every headline figure of evaluate's report.json, with its interval when it has one."""
    if not report:
        return ["(no evaluation report)"]
    figures = report.get("figures") or {}
    lines = ["| figure | value | 95% CI | n |", "|---|---|---|---|"]
    for name, f in figures.items():
        if isinstance(f, dict) and {"value", "lo", "hi"} <= set(f):
            lines.append(f"| {name} | {f['value']:.3f} | [{f['lo']:.3f}, {f['hi']:.3f}] | {f.get('n', '')} |")
    return lines


def render_card(
    recipe,
    rows: list[ArtifactParity],
    parity_md: str,
    dataset_card: str | None,
    report: dict | None,
    modelfile: str | None,
) -> str:
    accepted = {r.artifact for r in rows if r.status == "accepted"}
    lines = [
        f"# {recipe.export.model_name or recipe.name}",
        "",
        recipe.description or "A student distilled with Distill.",
        "",
        f"- base model: `{recipe.model.base}`",
        f"- recipe: `{recipe.name}` (resolved_config.yaml in this folder is the whole recipe it ran with)",
        f"- teacher: `{recipe.teacher.spec}`",
        f"- training: {recipe.train.method}, r={recipe.train.lora.r}, alpha={recipe.train.lora.alpha}",
        "",
        "## Dataset",
        "",
        *dataset_summary(dataset_card),
        "",
        "## Evaluation (test split, from the evaluate stage)",
        "",
        *evaluation_headline(report),
        "",
        "## Export parity (every artifact re-scored in its own runtime)",
        "",
        parity_md.rstrip(),
        "",
        "## Use",
        "",
    ]
    if "merged" in accepted:
        lines += [
            "- transformers: `AutoModelForCausalLM.from_pretrained('merged')` with its tokenizer and chat template",
            "- vLLM: `vllm serve ./merged`",
        ]
    if "adapter" in accepted:
        lines.append(
            f"- multi-LoRA servers: `vllm serve {recipe.model.base} --enable-lora --lora-modules "
            "student=./adapter` (the adapter alone; its base must be the one above)"
        )
    ggufs = [r for r in rows if r.artifact.startswith("gguf-") and r.status == "accepted"]
    for r in ggufs:
        lines.append(f"- llama.cpp: `llama-server -m {r.path}` ({r.artifact}, {r.bits_per_weight:.2f} bits/weight)")
    if modelfile:
        lines.append(f"- Ollama: `cd gguf && ollama create {recipe.export.model_name or recipe.name} -f Modelfile`")
    rejected = [r for r in rows if r.status == "rejected"]
    if rejected:
        lines += [
            "",
            "Rejected (kept for inspection, not registered): "
            + "; ".join(f"{r.artifact}: {'; '.join(r.reasons)}" for r in rejected),
        ]
    shape = ((report or {}).get("router") or {}).get("student_input", "user")
    reads = (
        "the conversation as the app sends it, system prompt and earlier turns included"
        if shape == "conversation"
        else "the user and assistant turns of a conversation, without a system prompt"
    )
    lines += [
        "",
        "## Intended use and limits",
        "",
        f"Intended for the task it was distilled on, answering {reads} (student_input={shape}), as the router "
        "serves it; "
        "the router escalates low-confidence requests to the teacher. Outside that task the student is the base "
        "model with a narrow fine-tune: expect the base's behaviour, not the teacher's. Agreement is measured "
        "against the teacher's answers, not ground truth, so it inherits the teacher's errors.",
    ]
    return "\n".join(lines) + "\n"
