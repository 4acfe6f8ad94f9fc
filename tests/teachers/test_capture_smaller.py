"""Issue 13's smaller items on the capture side: the local teacher keyed by model content,
a loopback teacher at $0 (the README's own example), requires-python, and curate's
byte-identical output across two processes.

    .venv/bin/pytest tests/teachers/test_capture_smaller.py -q
"""

import os
import shutil
import subprocess
import sys
import tomllib

from support.capture_helpers import ROOT, read_records, write_prompts, write_recipe
from support.fault_server import FaultServer

from pipeline.artifacts import read_manifest
from pipeline.cli import main
from pipeline.config import Recipe, TeacherConfig
from pipeline.stages import capture
from pipeline.teachers import build_teacher
from pipeline.teachers.cache import cache_key


def test_local_teacher_identity_and_capture_inputs_follow_the_model_content(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_llama_dir, folder)
    cfg = TeacherConfig(spec=f"local:{folder}", max_new_tokens=3)
    messages = [{"role": "user", "content": "hi"}]
    before = cache_key(build_teacher(cfg.spec, cfg).identity(), messages, 0)
    inputs = capture.file_inputs(Recipe(name="t", teacher=cfg))
    assert {"teacher_model/config.json", "teacher_model/model.safetensors"} <= set(inputs)

    weights = load_file(folder / "model.safetensors")
    save_file(
        {k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )  # retrained in place: same path, new weights
    after = cache_key(build_teacher(cfg.spec, cfg).identity(), messages, 0)
    assert after != before, "a model retrained in place would be answered from the old model's cache"
    assert capture.file_inputs(Recipe(name="t", teacher=cfg)) == inputs, "same files, whose hashes the runner takes"


def test_readme_example_a_loopback_openai_teacher_defaults_to_zero_dollars(tmp_path, caplog):
    write_prompts(tmp_path / "prompts.jsonl", 3)
    runs = tmp_path / "runs"
    with FaultServer() as server:
        # The README's line: teacher.spec=openai:local teacher.base_url=http://127.0.0.1:8080/v1, no price.
        recipe = write_recipe(tmp_path, {"timeout_s": 5})
        argv = [
            "capture",
            str(recipe),
            "teacher.spec=openai:local",
            f"teacher.base_url={server.base_url}",
            "--runs-dir",
            str(runs),
            "--force",
        ]
        with caplog.at_level("INFO"):
            assert main(argv) == 0
    assert [r["meta"]["cost_usd"] for r in read_records(runs)] == [0.0, 0.0, 0.0]
    assert any("self-hosted" in note for note in read_manifest(runs / "cap" / "capture").notes)
    assert sum("self-hosted, priced at $0" in m for m in caplog.messages) == 1


def test_requires_python_admits_only_versions_with_taskgroup():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"].split("#")[0].strip() == ">=3.11"
    assert "TaskGroup" in (ROOT / "pipeline" / "teachers" / "dispatch.py").read_text()


CURATE_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from support.curate_records import TASK_YAML, capture_records
from pipeline.config import Recipe
from pipeline.stages import curate
from pipeline.tracking import NullTracker
base, out = sys.argv[1], Path(sys.argv[2])
root = out.parent
(root / "task.yaml").write_text(TASK_YAML)
(root / "capture").mkdir(exist_ok=True)
(root / "capture" / "teacher.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in capture_records()))
recipe = Recipe(name="t", model={"base": base}, curate={"min_examples": 10, "target_size": 30, "pii": True},
                train={"max_seq_len": 256})
out.mkdir()
curate.run(recipe, {"task": root / "task.yaml", "capture": root / "capture"}, out, NullTracker())
"""


def test_curate_is_byte_identical_across_two_processes(tmp_path, embedded_dir):
    from pipeline.artifacts import hash_outputs

    outs = []
    for name, seed in (("one", "0"), ("two", "12345")):  # different hash seeds: set/dict order may differ
        out = tmp_path / name / "out"
        out.parent.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", CURATE_SCRIPT, str(embedded_dir), str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(hash_outputs(out))
    assert outs[0] == outs[1] and len(outs[0]) > 5
