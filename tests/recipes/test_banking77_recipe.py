"""The Banking77 recipe: it validates, its task has the 77 intents, its curate numbers give
942 / 154 / 154, and its logs: import reads a CSV of the shared file's shape (text,category)
and a hub-shaped dataset (integer ClassLabel column). Fixtures only: CI has no ../shared."""

import csv
import json
from pathlib import Path

import pytest

from pipeline.config import load_recipe
from pipeline.errors import DistillError
from pipeline.task import load_task
from pipeline.teachers.logs import import_logs

ROOT = Path(__file__).resolve().parents[2]
LABELS_SAMPLE = ["card_arrival", "Refund_not_showing_up", "reverted_card_payment?", "top_up_failed", "age_limit"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("banking77-cpu", root=ROOT)


@pytest.fixture(scope="module")
def task(recipe):
    return load_task(ROOT / recipe.capture.task)


def write_csv(path: Path, n: int = 20) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        for i in range(n):
            writer.writerow([f"query {i}, about my {LABELS_SAMPLE[i % 5].replace('_', ' ')}?", LABELS_SAMPLE[i % 5]])
    return path


def test_the_recipe_imports_banking77_labels_and_curates_1250(recipe, task):
    assert recipe.teacher.spec.startswith("logs:") and recipe.teacher.spec.endswith("banking77/train.csv")
    assert (recipe.teacher.prompt_col, recipe.teacher.label_col, recipe.capture.gold_field) == (
        "text",
        "category",
        "category",
    )
    assert recipe.curate.target_size == 1250
    assert task.kind == "classification" and len(task.labels) == len(set(task.labels)) == 77
    assert set(LABELS_SAMPLE) <= set(task.labels)  # the dataset's own spellings, oddities included
    longest = max(task.labels, key=len)
    assert longest in task.instructions and "reverted_card_payment?" in task.instructions


def test_its_split_fractions_give_942_154_154_over_77_balanced_intents(recipe, task):
    from pipeline.curation.selection import balanced_quotas, stratified_split

    quotas = balanced_quotas({label: 100 for label in task.labels}, recipe.curate.target_size)
    examples = [{"id": f"{label}-{i}", "label": label} for label, k in quotas.items() for i in range(k)]
    splits = stratified_split(examples, recipe.curate.split.validation, recipe.curate.split.test, recipe.curate.seed)
    assert {s: len(rows) for s, rows in splits.items()} == {"train": 942, "validation": 154, "test": 154}
    assert {ex["label"] for ex in splits["test"]} == set(task.labels)


def test_the_import_reads_a_csv_of_the_shared_files_shape(recipe, task, tmp_path):
    imported = import_logs(write_csv(tmp_path / "train.csv"), recipe.teacher.prompt_col, recipe.teacher.label_col)
    assert len(imported.records) == 20 and not imported.rejected
    assert [task.normalize_label(r.answer) for r in imported.records] == [r.answer for r in imported.records]
    assert imported.records[2].answer == "reverted_card_payment?" and imported.records[0].where.endswith(":2")


def test_capture_with_the_recipe_writes_teacher_and_gold_labels(tmp_path, monkeypatch):
    from pipeline.cli import main

    data = write_csv(tmp_path / "train.csv")
    monkeypatch.chdir(ROOT)  # the recipe's task path is relative to the project, as `distill` runs it
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "capture",
                "banking77-cpu",
                f"teacher.spec=logs:{data}",
                f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                "--runs-dir",
                str(runs),
            ]
        )
        == 0
    )
    records = [
        json.loads(line) for line in (runs / "banking77-cpu" / "capture" / "teacher.jsonl").read_text().splitlines()
    ]
    assert len(records) == 20
    assert all(r["messages"][-1]["content"] == r["meta"]["gold"] for r in records)
    assert records[1]["messages"][-1]["content"] == "Refund_not_showing_up"


def write_hub_shaped(folder: Path) -> Path:
    """What a hub dataset repo holds: parquet with integer labels, names in the README's features."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    names = "\n".join(f"          '{i}': {json.dumps(name)}" for i, name in enumerate(LABELS_SAMPLE))
    (folder / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  - name: label\n    dtype:\n"
        f"      class_label:\n        names:\n{names}\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*\n---\n"
    )
    pq.write_table(
        pa.table({"text": ["where is my card", "my refund is missing", "no label here"], "label": [0, 1, -1]}),
        folder / "data" / "train-00000-of-00001.parquet",
    )
    return folder


def test_a_hub_shaped_dataset_gives_label_names_not_integers(tmp_path):
    imported = import_logs(write_hub_shaped(tmp_path / "banking77"), "text", "label")
    assert [(r.messages[-1]["content"], r.answer) for r in imported.records] == [
        ("where is my card", "card_arrival"),
        ("my refund is missing", "Refund_not_showing_up"),
    ]
    assert len(imported.rejected) == 1 and "no 'label'" in imported.rejected[0][1]  # -1: unlabelled, not index -1


def test_a_hub_id_offline_says_to_pass_a_local_file():
    with pytest.raises(DistillError, match=r"PolyAI/banking77: .*hub could not be reached.*pass the local file"):
        import_logs("PolyAI/banking77", "text", "label")


def test_capture_imports_a_dataset_folder_or_hub_id_not_only_a_file(tmp_path, monkeypatch, capsys):
    # A folder (or hub id) is not a stage input file: capture must not stop at "file not found"
    # before the import runs. Offline, a hub id then fails with the import's own hint.
    from pipeline.cli import main

    folder = write_hub_shaped(tmp_path / "banking77")
    monkeypatch.chdir(ROOT)
    common = [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "--runs-dir", str(tmp_path / "runs")]
    hub_columns = ["teacher.prompt_col=text", "teacher.label_col=label"]  # the hub copy names its columns so
    assert main(["capture", "banking77-cpu", f"teacher.spec=logs:{folder}", *hub_columns, *common]) == 0
    records = (tmp_path / "runs" / "banking77-cpu" / "capture" / "teacher.jsonl").read_text().splitlines()
    assert [json.loads(r)["messages"][-1]["content"] for r in records] == ["card_arrival", "Refund_not_showing_up"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    assert main(["capture", "banking77-cpu", "teacher.spec=logs:PolyAI/banking77", *hub_columns, *common]) != 0
    assert "hub could not be reached" in capsys.readouterr().err
