"""The curate stage end to end on a small handmade capture: contract, card, determinism, errors."""

import json
import random
from pathlib import Path

import pytest

from pipeline.artifacts import hash_outputs
from pipeline.config import Recipe
from pipeline.curation.dedup import NgramIndex
from pipeline.errors import DistillError
from pipeline.stages import curate

LABELS = ["track_order", "return_item", "refund_status"]
TASK_YAML = """\
name: mini
kind: classification
instructions: Reply with one label.
labels: [track_order, return_item, refund_status]
"""
LEAK = "my parcel was due on tuesday and the tracking page has not moved since then"


class RecordingTracker:
    def __init__(self):
        self.metrics_logged: dict = {}
        self.artifacts: list[str] = []

    def metrics(self, metrics, step=None):
        self.metrics_logged.update(metrics)

    def artifact(self, path, subdir=None):
        self.artifacts.append(Path(path).name)


def record(i: int, prompt: str, answer: str, **meta) -> dict:
    return {"id": f"r{i:03d}", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "meta": {"teacher": "openai:gpt-test", "logprobs": -0.1 * (i % 7), "finish_reason": "stop", "error": None,
                     "cost_usd": 0.002, **meta}}


def capture_records() -> list[dict]:
    """60 distinct prompts (random words, so no two are near-duplicates), a planted family of
    test/train leaks, and one record for each normalise-step failure."""
    rng = random.Random(7)
    vocab = [f"{a}{b}" for a in ("bla", "cro", "dun", "fel", "gri", "hop", "jun", "kel") for b in "aeiouyz"]
    records = []
    for i in range(60):
        label = LABELS[i % 3]
        records.append(record(i, " ".join(rng.sample(vocab, 9)) + f" {label.split('_')[0]}?", label.replace("_", " ").title()))
    for k, extra in enumerate(["Hi!", "Hello.", "Thanks.", "Regards, Sam", "Good morning.", "Cheers, Ana", "ASAP!", "thx",
                               "Hey.", "Yo!", "Help!", "Cheers, Tom", "Quick one.", "Urgent!", "Sorry.", "Best, Mei"]):
        records.append(record(100 + k, f"{extra} {LEAK}", "track_order"))
    records.append(record(200, "please help", "I'm sorry, but I can't help with that."))
    records.append(record(201, "where is it", "", error="timeout"))
    records.append(record(202, "where is it now", "The customer is asking", finish_reason="length"))
    records.append(record(203, "bla cro dun", "shipping"))
    return records


@pytest.fixture
def setup(tmp_path, embedded_dir):
    task = tmp_path / "task.yaml"
    task.write_text(TASK_YAML)
    capture = tmp_path / "capture"
    capture.mkdir()
    (capture / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in capture_records()))

    def run(name="out", **curate_cfg):
        recipe = Recipe(name="t", model={"base": str(embedded_dir)}, curate={"min_examples": 10, **curate_cfg},
                        train={"max_seq_len": 256})
        out = tmp_path / name
        out.mkdir()
        tracker = RecordingTracker()
        inputs = {"task": task, "capture": capture}
        if recipe.curate.eval_file is not None:
            inputs["eval_file"] = recipe.curate.eval_file
        manifest = curate.run(recipe, inputs, out, tracker)
        return manifest, out, tracker

    return run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_writes_the_contract_and_a_card(setup):
    from datasets import load_from_disk

    manifest, out, tracker = setup()
    assert {"train.jsonl", "validation.jsonl", "test.jsonl", "card.md", "lengths.png", "dataset/dataset_dict.json"} <= {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    dataset = load_from_disk(str(out / "dataset"))
    assert {"id", "prompt", "completion", "label", "gold", "teacher", "teacher_logprob", "confidence"} <= set(
        dataset["train"].column_names)
    rows = [r for split in dataset.values() for r in split]
    assert all(r["completion"] == r["label"] and r["label"] in LABELS for r in rows), "answers normalised to labels"
    assert read_jsonl(out / "train.jsonl")[0]["messages"][1]["role"] == "assistant"
    c = manifest.counts
    assert c["input"] == 80 and c["kept"] == c["train"] + c["validation"] + c["test"]
    assert c["removed_refusal"] == 1 and c["removed_failed_call"] == 1 and c["removed_truncated"] == 1
    assert c["removed_off_label"] == 1
    card = (out / "card.md").read_text()
    for needle in ("## Steps", "| normalise | 80 |", "## Label distribution", "![lengths.png](lengths.png)",
                   "| openai:gpt-test | 80 | 0.1600 |", "normalise / refusal"):
        assert needle in card, needle
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tracker.artifacts == ["card.md", "lengths.png"] and tracker.metrics_logged["kept"] == c["kept"]


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
    prompts = [r["messages"][0]["content"] for s in ("train", "validation", "test") for r in read_jsonl(out / f"{s}.jsonl")]
    assert not any(LEAK in p.lower() for p in prompts)
    assert "eval_file" in curate.file_inputs(Recipe(name="t", curate={"eval_file": str(eval_file)}))


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
