"""Every bad input the issue lists, through the real CLI: one line naming the file (and line,
key or column), a non-zero exit, and no teacher call made.

    .venv/bin/pytest tests/cli/test_bad_inputs.py -q
"""

from pathlib import Path

import pytest
from support.capture_helpers import fast_retries, write_prompts, write_recipe
from support.fault_server import FaultServer

from pipeline.cli import main


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def write_bytes(name: str, data: bytes):
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return make


def corrupt_manifest(folder: Path) -> Path:
    """A capture folder whose manifest.json was cut off (a copy interrupted half-way)."""
    write_prompts(folder / "prompts.jsonl", 2)
    stage = folder / "runs" / "cap" / "capture"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text('{"stage": "capture", "counts": {')
    return folder / "prompts.jsonl"


# (id, how to make the prompts file, extra overrides, command, what the one line must hold)
CASES = [
    ("override-yaml", None, ["train.lr=[1,"], "validate", ["override 'train.lr=[1,'", "invalid YAML"]),
    (
        "jsonl-not-utf8",
        write_bytes("p.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'),
        [],
        "capture",
        ["p.jsonl:2: not UTF-8", "column 16"],
    ),
    (
        "json-broken",
        write_bytes("p.json", b'[{"prompt": "a"},\n {"prompt": "b"\n'),
        [],
        "capture",
        ["p.json:3: invalid JSON"],
    ),
    (
        "parquet-corrupt",
        write_bytes("p.parquet", b"PAR1 this is not parquet PAR1"),
        [],
        "capture",
        ["p.parquet: not a readable Parquet file"],
    ),
    (
        "csv-nul",
        write_bytes("p.csv", b"id,prompt\na,hello\nb,wor\x00ld\n"),
        [],
        "capture",
        ["p.csv:3: NUL byte in column 'prompt'"],
    ),
    (
        "hub-id-typo",
        None,
        ["model.base=HuggingFaceTB/SmolLM2-135M-Instructt"],
        "capture",
        ["model.base: 'HuggingFaceTB/SmolLM2-135M-Instructt'", "HF_HUB_OFFLINE"],
    ),
    ("local-teacher-unknown", None, ["teacher.spec=local:foo"], "capture", ["teacher.spec=local:foo: 'foo'"]),
    (
        "path-without-dot",
        None,
        ["model.base=runs/student/export/merged"],
        "capture",
        ["model.base: 'runs/student/export/merged' is neither an existing folder"],
    ),
    (
        "chat-template-missing",
        None,
        ["model.chat_template=recipes/templates/nope.jinja"],
        "capture",
        ["model.chat_template: recipes/templates/nope.jinja does not exist"],
    ),
    (
        "chat-template-missing-validate",
        None,
        ["model.chat_template=recipes/templates/nope.jinja"],
        "validate",
        ["model.chat_template: recipes/templates/nope.jinja does not exist"],
    ),
    (
        "task-file-missing-validate",
        None,
        ["capture.task=data/nope.yaml", "eval.file=nope.jsonl"],
        "validate",
        ["capture.task: data/nope.yaml does not exist", "eval.file: nope.jsonl does not exist"],
    ),
    (
        "optim-unknown",
        None,
        ["train.optim=adamw_foo"],
        "validate",
        ["train.optim: 'adamw_foo' is not a transformers optimizer", "did you mean 'adamw_torch'"],
    ),
    (
        "lora-target-typo",
        None,
        ["train.lora.targets=[q_proj,vproj]"],
        "capture",
        ["train.lora.targets: 'vproj' matches no module", "did you mean 'v_proj'"],
    ),
    ("manifest-corrupt", corrupt_manifest, [], "capture-resume", ["capture/manifest.json: not a valid manifest"]),
]


@pytest.mark.parametrize(("make", "overrides", "command", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_where_and_a_non_zero_exit(
    make, overrides, command, needles, tmp_path, server, tracking_uri, capsys
):
    prompts = make(tmp_path) if make else write_prompts(tmp_path / "prompts.jsonl", 2)
    recipe = write_recipe(tmp_path, fast_retries(server.base_url), tracking_uri=tracking_uri)
    if prompts.name != "prompts.jsonl":
        overrides = [*overrides, f"capture.prompts={prompts}"]
    before = server.total
    if command == "validate":
        argv = ["validate", str(recipe), *overrides]
    else:  # capture; "capture-resume" reads the existing stage folder instead of forcing over it
        argv = ["capture", str(recipe), *overrides, "--runs-dir", str(tmp_path / "runs")]
        argv += [] if command == "capture-resume" else ["--force"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in line, line
    assert server.total == before, "the teacher was asked before the bad input was found"


def test_a_csv_saved_by_excel_with_a_bom_just_works(tmp_path, server, tracking_uri):
    prompts = tmp_path / "p.csv"
    prompts.write_bytes("prompt,id\r\nfirst question,a\r\nsecond question,b\r\n".encode("utf-8-sig"))
    recipe = write_recipe(tmp_path, fast_retries(server.base_url), tracking_uri=tracking_uri)
    argv = ["capture", str(recipe), f"capture.prompts={prompts}", "--runs-dir", str(tmp_path / "runs"), "--force"]
    assert main(argv) == 0
    assert (tmp_path / "runs" / "cap" / "capture" / "teacher.jsonl").read_text().count("\n") == 2
