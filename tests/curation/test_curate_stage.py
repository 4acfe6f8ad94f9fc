"""The curate stage end to end on a small handmade capture: contract, card, determinism, errors."""

import json
from pathlib import Path

import pytest
import yaml
from support.curate_records import LABELS, LEAK, TASK_YAML, capture_records

from pipeline.artifacts import hash_outputs
from pipeline.config import Recipe
from pipeline.curation.card import removed_counts
from pipeline.curation.dedup import NgramIndex
from pipeline.curation.records import removal
from pipeline.curation.steps import SPLIT, STEPS, TEST_DECONTAMINATION, CurateContext, CurateStep, StepResult
from pipeline.errors import DistillError
from pipeline.llm.loading import load_tokenizer
from pipeline.stages import curate
from pipeline.task import Task
from pipeline.tracking import NullTracker


@pytest.fixture
def setup(tmp_path, embedded_dir):
    task = tmp_path / "task.yaml"
    task.write_text(TASK_YAML)
    capture = tmp_path / "capture"
    capture.mkdir()
    (capture / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in capture_records()))

    def run(name="out", eval_file=None, **curate_cfg):
        recipe = Recipe(
            name="t",
            model={"base": str(embedded_dir)},
            curate={"min_examples": 10, **curate_cfg},
            train={"max_seq_len": 256},
            eval={"file": eval_file},
        )
        out = tmp_path / name
        out.mkdir()
        tracker = NullTracker()
        inputs = {"task": task, "capture": capture}
        if recipe.eval.file is not None:
            inputs["eval_file"] = recipe.eval.file
        manifest = curate.run(recipe, inputs, out, tracker)
        return manifest, out, tracker

    return run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_writes_the_contract_and_a_card(setup):
    from datasets import load_from_disk

    manifest, out, tracker = setup()
    assert {"train.jsonl", "validation.jsonl", "test.jsonl", "card.md", "lengths.png", "dataset/dataset_dict.json"} <= {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
    }
    dataset = load_from_disk(str(out / "dataset"))
    assert {"id", "messages", "completion", "label", "gold", "teacher", "teacher_logprob", "confidence"} <= set(
        dataset["train"].column_names
    )
    rows = [r for split in dataset.values() for r in split]
    assert all(r["completion"] == r["label"] and r["label"] in LABELS for r in rows), "answers normalised to labels"
    assert read_jsonl(out / "train.jsonl")[0]["messages"][1]["role"] == "assistant"
    c = manifest.counts
    assert c["input"] == 80 and c["kept"] == c["train"] + c["validation"] + c["test"]
    assert c["removed_refusal"] == 1 and c["removed_failed_call"] == 1 and c["removed_truncated"] == 1
    assert c["removed_off_label"] == 1
    card = (out / "card.md").read_text()
    for needle in (
        "## Steps",
        "| normalise | 80 |",
        "## Label distribution",
        "![lengths.png](lengths.png)",
        "| openai:gpt-test | 80 | 0.1600 |",
        "normalise / refusal",
    ):
        assert needle in card, needle
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [a.name for a, _ in tracker.artifacts] == ["card.md", "lengths.png"] and tracker.last_metrics()["kept"] == c[
        "kept"
    ]


def test_planted_test_train_overlap_is_removed_from_test(setup):
    manifest, out, _ = setup(near_dup_threshold=None)  # the leak family are not near-dups of each other anyway
    train = [r["messages"][0]["content"] for r in read_jsonl(out / "train.jsonl")]
    test = [r["messages"][0]["content"] for r in read_jsonl(out / "test.jsonl")]
    index = NgramIndex(train, n=8)
    assert any(LEAK in p.lower() for p in train)
    assert manifest.counts["removed_test_train_overlap"] >= 1
    assert all(index.overlap(p) < 0.5 for p in test)


def test_external_eval_file_decontaminates_every_split(setup, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": LEAK.upper()}) + "\n")
    manifest, out, _ = setup(eval_file=str(eval_file))
    assert manifest.counts["removed_eval_overlap"] >= 1
    prompts = [
        r["messages"][0]["content"] for s in ("train", "validation", "test") for r in read_jsonl(out / f"{s}.jsonl")
    ]
    assert not any(LEAK in p.lower() for p in prompts)
    assert "eval_file" in curate.file_inputs(Recipe(name="t", eval={"file": str(eval_file)}))


def test_same_input_and_config_give_byte_identical_outputs(setup):
    _, first, _ = setup("one", target_size=30, pii=True)
    _, second, _ = setup("two", target_size=30, pii=True)
    hashes = hash_outputs(first)
    assert any(k.startswith("dataset/") and k.endswith("state.json") for k in hashes)
    assert hashes == hash_outputs(second)


def test_target_size_above_survivors_warns_but_too_few_for_min_examples_fails(setup):
    manifest, out, _ = setup(target_size=5000)
    assert manifest.notes and "curate.target_size=5000" in manifest.notes[0]
    assert "**Warning:**" in (out / "card.md").read_text()
    with pytest.raises(DistillError, match=r"only \d+ of 80 teacher records survived .*min_examples=500.*refusal=1"):
        setup("fail", min_examples=500)


# ---------------------------------------------------------------- the step registry


def card_steps(card: str) -> list[str]:
    """Step names in the card's steps table, in row order (checking the row numbers run 1..n)."""
    section = card.split("## Steps\n")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line[:3].strip("| ").isdigit()]
    assert [int(r[0].strip("| ")) for r in rows] == list(range(1, len(rows) + 1))
    return [r[1] for r in rows]


OPTIONAL = ("pii scrub", "decontaminate (eval file)", "decontaminate (frozen splits)")


def test_card_lists_the_registry_steps_in_registry_order(setup, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": LEAK}) + "\n")
    _, out, _ = setup(pii=True, eval_file=str(eval_file))
    frozen = "decontaminate (frozen splits)"  # retrain's rounds only (tests/loop/test_loop.py)
    assert card_steps((out / "card.md").read_text()) == [s.name for s in STEPS if s.name != frozen] + [
        SPLIT,
        TEST_DECONTAMINATION,
    ]
    assert set(OPTIONAL) <= {s.name for s in STEPS}


def test_pii_and_eval_file_steps_are_skipped_when_off(setup):
    manifest, out, _ = setup()
    card = (out / "card.md").read_text()
    assert card_steps(card) == [s.name for s in STEPS if s.name not in OPTIONAL] + [SPLIT, TEST_DECONTAMINATION]
    assert "## PII replaced" not in card and not any(k.startswith("pii_") for k in manifest.counts)


@pytest.fixture
def ctx(embedded_dir) -> CurateContext:
    recipe = Recipe(name="t", model={"base": str(embedded_dir)}, train={"max_seq_len": 256})
    task = Task.model_validate(yaml.safe_load(TASK_YAML))
    return CurateContext.from_recipe(recipe, task, load_tokenizer(recipe.model.base), None)


def drop_refunds(examples: list[dict], ctx: CurateContext) -> StepResult:
    """A step written against the common signature only."""
    kept, removed = [], []
    for ex in examples:
        (removed if ex["prompt"].endswith("refund?") else kept).append(ex)
    return StepResult(kept, [removal(ex, "no_refunds") for ex in removed])


def test_a_step_with_the_common_signature_can_be_added_to_the_registry(ctx):
    after_length = [s.name for s in STEPS].index("length") + 1
    registry = STEPS[:after_length] + (CurateStep("no refunds", drop_refunds),) + STEPS[after_length:]
    result = curate.curate_records(capture_records(), ctx, registry)
    trail = {s.name: s for s in result.steps}
    assert [s.name for s in result.steps][:4] == ["normalise", "length", "no refunds", "exact dedupe"]
    assert trail["no refunds"].n_in - trail["no refunds"].n_out == removed_counts(result.steps)["no_refunds"] > 0
    assert not any(ex["prompt"].endswith("refund?") for split in result.splits.values() for ex in split)
    assert any(
        ex["prompt"].endswith("refund?")
        for split in curate.curate_records(capture_records(), ctx).splits.values()
        for ex in split
    ), "the default registry keeps them"


def test_a_step_removed_from_the_registry_does_not_run(ctx):
    full = curate.curate_records(capture_records(), ctx)
    assert removed_counts(full.steps).get("near_duplicate", 0) > 0, "the fixture has near-duplicates"
    registry = tuple(s for s in STEPS if s.name != "near-dup (MinHash)")
    result = curate.curate_records(capture_records(), ctx, registry)
    names = [s.name for s in result.steps]
    assert "near-dup (MinHash)" not in names and "near_duplicate" not in removed_counts(result.steps)
    after_exact = result.steps[names.index("exact dedupe") + 1]
    assert after_exact.n_in == result.steps[names.index("exact dedupe")].n_out


def test_optional_steps_decide_from_the_context(ctx):
    enabled = {s.name: s.enabled for s in STEPS}
    assert not enabled["pii scrub"](ctx) and not enabled["decontaminate (eval file)"](ctx)
    on = CurateContext(ctx.task, ctx.cfg.model_copy(update={"pii": True}), ctx.max_seq_len, ctx.tokenizer, ("a b",))
    assert enabled["pii scrub"](on) and enabled["decontaminate (eval file)"](on)
    assert not enabled["decontaminate (frozen splits)"](ctx)
    assert enabled["decontaminate (frozen splits)"](
        CurateContext(ctx.task, ctx.cfg, ctx.max_seq_len, ctx.tokenizer, frozen_test=({"prompt": "a b"},))
    )
    assert all(s.enabled(ctx) for s in STEPS if s.name not in OPTIONAL)


def with_system(records: list[dict], system) -> list[dict]:
    """The records as an app sends them: a system prompt (`system(i)`) first."""
    return [
        {**r, "messages": [{"role": "system", "content": system(i)}, *r["messages"]]} for i, r in enumerate(records)
    ]


@pytest.mark.parametrize(
    "system,shape",
    [
        (lambda i: "You triage support messages. Reply with one label.", "user"),
        (lambda i: f"Reply with one label. Customer #{i}, tier {i % 3}.", "conversation"),
        (None, "user"),
    ],
)
def test_auto_learns_a_shared_system_prompt_away_and_keeps_a_varying_one(setup, tmp_path, system, shape):
    """student_input=auto: one system prompt shared by every record is learned away (and named in the
    card); one carrying per-request data is kept. The splits keep the conversation as sent either way."""
    from datasets import load_from_disk

    records = capture_records() if system is None else with_system(capture_records(), system)
    (tmp_path / "capture" / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, out, _ = setup()
    view = json.loads((out / "student_input.json").read_text())
    assert (view["requested"], view["shape"]) == ("auto", shape)
    card = (out / "card.md").read_text()
    assert f"The student reads: **{shape}**" in card
    if system is not None and shape == "user":
        assert view["static_system_prompt"] == system(0) and f"> {system(0)}" in card
    first = read_jsonl(out / "train.jsonl")[0]
    source = next(r for r in records if r["id"] == first["id"])
    assert first["messages"][:-1] == source["messages"][:-1]  # as sent, whatever the student reads
    row = load_from_disk(str(out / "dataset"))["train"][0]
    assert row["messages"] == first["messages"][:-1]


def test_an_escalations_weight_reaches_training_as_repeated_rows(setup, tmp_path):
    from datasets import load_from_disk

    from pipeline.stages.finetune import oversampled

    records = capture_records()
    weights = {r["id"]: 1 + i % 3 for i, r in enumerate(records[:12])}  # 1, 2 or 3
    for r in records[:12]:
        r["meta"]["weight"] = weights[r["id"]]
    (tmp_path / "capture" / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, out, _ = setup()

    train = load_from_disk(str(out / "dataset"))["train"]
    kept = {row["id"]: row["weight"] for row in train}
    assert {i: w for i, w in kept.items() if i in weights} == {i: weights[i] for i in kept if i in weights}
    assert any(w > 1 for w in kept.values()), "a weighted record reached the train split"
    # The chat records a later round gathers keep the weight; an unweighted one says nothing.
    on_disk = {r["id"]: r["meta"].get("weight") for r in read_jsonl(out / "train.jsonl")}
    assert all(on_disk[i] == (w if w > 1 else None) for i, w in kept.items())

    rows = oversampled(train)
    assert len(rows) == sum(kept.values())
    assert {i: rows["id"].count(i) for i in kept} == kept


def test_a_capture_record_with_a_bad_weight_names_file_and_line(tmp_path):
    from pipeline.stages.capture import run_records

    good, bad = capture_records()[:2]
    bad["meta"]["weight"] = 0
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DistillError, match=r"records\.jsonl:2: .*meta\.weight must be a whole number >= 1, got 0"):
        run_records(path, tmp_path, NullTracker())
