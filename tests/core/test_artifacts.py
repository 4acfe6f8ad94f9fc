import json

import pytest

from pipeline.artifacts import (
    Manifest,
    atomic_dir,
    atomic_write_text,
    hash_outputs,
    read_jsonl,
    read_manifest,
    write_manifest,
)
from pipeline.errors import DistillError


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_keeps_old_content_when_writer_fails(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "f").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("crash")
    assert (final / "f").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_jsonl_names_file_and_line_of_a_broken_record(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(DistillError, match=rf"{path}:3: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DistillError, match=rf"{path}:2: expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(DistillError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_manifest_round_trip_and_output_hashes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("x")
    outputs = hash_outputs(tmp_path)
    write_manifest(tmp_path, Manifest(stage="s", fingerprint="f", outputs=outputs, counts={"n": 1}))
    back = read_manifest(tmp_path)
    assert back.outputs == {"sub/x.txt": outputs["sub/x.txt"]} and back.counts == {"n": 1}
    assert "manifest.json" not in hash_outputs(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["stage"] == "s"
