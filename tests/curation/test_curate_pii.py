"""With curate.pii=true no raw personal data reaches the card, any output file or MLflow
(issue 13, item 3): planted e-mails and card numbers in records that every kind of step
removes, and in records that are kept.

    .venv/bin/pytest tests/curation/test_curate_pii.py -q
"""

from pathlib import Path

from support.curate_records import TASK_YAML, capture_records, record

from pipeline.config import Recipe
from pipeline.stages import curate
from pipeline.tracking import Tracker

EMAIL = "alice.smith@example.com"
CARD = "4111 1111 1111 1111"  # Luhn-valid
PLANTED = (EMAIL, CARD, CARD.replace(" ", ""), "alice.smith", "4111 1111")


def planted_records() -> list[dict]:
    pii = f"mail {EMAIL} card {CARD}"
    return capture_records() + [
        record(300, f"please help {pii}", "I'm sorry, but I can't help with that."),  # normalise: refusal
        record(301, f"where is it {pii}", "", error="timeout"),  # normalise: failed call
        record(302, f"bla cro dun {pii}", "shipping"),  # answer format: off label
        record(303, f"kept one {pii} where is my parcel", "track_order"),
        record(304, f"kept one {pii} where is my parcel", "track_order"),  # exact duplicate
        record(305, f"{pii} " + "very long words " * 200, "track_order"),  # length
    ]


def test_no_raw_pii_in_the_card_the_outputs_or_mlflow(tmp_path, embedded_dir):
    import json

    from mlflow.tracking import MlflowClient

    task = tmp_path / "task.yaml"
    task.write_text(TASK_YAML)
    capture = tmp_path / "capture"
    capture.mkdir()
    (capture / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted_records()))
    recipe = Recipe(
        name="t",
        model={"base": str(embedded_dir)},
        curate={"min_examples": 10, "pii": True},
        train={"max_seq_len": 256},
    )
    out = tmp_path / "out"
    out.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "pii")
    with tracker.run("curate") as run_id:
        manifest = curate.run(recipe, {"task": task, "capture": capture}, out, tracker)

    counts = manifest.counts
    assert counts["pii_email"] >= 6 and counts["pii_card"] >= 6
    assert counts["removed_refusal"] == 2 and counts["removed_failed_call"] == 2 and counts["removed_off_label"] == 2
    assert counts.get("removed_exact_duplicate", 0) >= 1 and counts.get("removed_over_max_seq_len", 0) >= 1, counts
    card = (out / "card.md").read_text()
    assert "[EMAIL]" in card and "[CARD]" in card, "the scrubbed examples are still shown"

    artifacts = Path(MlflowClient(uri).download_artifacts(run_id, "", str(tmp_path / "downloaded")))
    files = [p for folder in (out, artifacts) for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"card.md", "train.jsonl", "test.jsonl", "validation.jsonl", "lengths.png"}
    for path in files:
        data = path.read_bytes()
        leaks = [s for s in PLANTED if s.encode() in data]
        assert not leaks, f"{path} holds {leaks}"
