"""What the hardware and the hub allow, decided before anything heavy runs, on this CPU-only torch:
gated hub models fail in one line before capture (a loopback server answering as the hub does),
QLoRA or a 1B+ base without CUDA is refused naming the torch build, the driver and the fix,
several GPUs without a launcher are refused naming the `accelerate launch` command (the device
count faked: the hardware is what cannot run here), a stage's model is freed when the stage ends,
and CUDA loads go straight to the device.

    .venv/bin/pytest -q tests/runner/test_device_policy.py
"""

import gc
import os
import subprocess
import sys
import threading
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import Recipe, load_recipe
from pipeline.errors import DistillError
from pipeline.llm import loading
from pipeline.llm.loading import DevicePlan

ROOT = Path(__file__).resolve().parents[2]
GATED, MISSING = "acme/gated-7b", "acme/no-such-model"


# ---------------------------------------------------------------- gated models (a fake hub on loopback)


class FakeHub(BaseHTTPRequestHandler):
    """Answers every request about GATED as the hub does for a gated repo whose terms the caller has
    not accepted: 401 without a token, 403 with one (X-Error-Code: GatedRepo); MISSING: 401 RepoNotFound."""

    requests: list[tuple[str, str, bool]] = []

    def _answer(self):
        authorized = "authorization" in {k.lower() for k in self.headers}
        FakeHub.requests.append((self.command, self.path, authorized))
        if GATED in self.path:
            status = 403 if authorized else 401
            message = (
                f"Access to model {GATED} is restricted and you are not in the authorized list."
                if authorized
                else f"Access to model {GATED} is restricted. You must have access to it "
                "and be authenticated to access it. Please log in."
            )
            headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": message}
        else:
            status, headers = 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        body = b'{"error": "denied"}'
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def online_env(hub: str, tmp_path: Path, token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGING"))}
    env |= {
        "HF_ENDPOINT": hub,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_ETAG_TIMEOUT": "5",
    }
    return env | ({"HF_TOKEN": token} if token else {})


def test_a_gated_base_fails_capture_in_one_line_before_anything_is_captured(hub, tmp_path):
    FakeHub.requests.clear()
    csv = tmp_path / "logs.csv"
    csv.write_text("text,category\nwhere is my card,card_arrival\n")
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "gated",
                "model": {"base": GATED},
                "teacher": {"spec": f"logs:{csv}", "prompt_col": "text", "label_col": "category"},
                "capture": {"task": str(ROOT / "data" / "banking77_task.yaml")},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "capture", str(recipe), "--runs-dir", str(tmp_path / "runs")],
        env=online_env(hub, tmp_path, token=None),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line[:2].isdigit()]  # log lines start with a time
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = errors[0]
    assert line.startswith(f"error: model.base: {GATED} is gated: accept its terms at {hub}/{GATED}"), line
    assert "HF_TOKEN" in line and "hf auth login" in line
    assert any(path == f"/api/models/{GATED}/auth-check" for _, path, _ in FakeHub.requests)
    assert not (tmp_path / "runs" / "gated" / "capture").exists()


def test_every_load_of_a_gated_or_missing_repo_says_what_to_do(hub, tmp_path):
    """With a token whose account was not granted access (403), the access check and the wrapped
    from_pretrained calls (tokenizer, model) all end in the same one line; a missing repo in another."""
    script = f"""
from pipeline.errors import DistillError
from pipeline.llm.loading import check_hub_access, device_plan, load_model, load_tokenizer
for call in (lambda: check_hub_access({GATED!r}, "model.base"), lambda: load_tokenizer({GATED!r}),
             lambda: load_model({GATED!r}, device_plan()), lambda: check_hub_access({MISSING!r}, "teacher.spec")):
    try:
        call()
        print("loaded")
    except DistillError as err:
        print(err)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=online_env(hub, tmp_path, token="hf_test_token"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 4, proc.stdout + proc.stderr
    for line in lines[:3]:
        assert f"{GATED} is gated and this token's account has no access yet: accept its terms at {hub}/{GATED}" in line
    assert lines[0].startswith("model.base: ") and lines[1].startswith("loading: ")
    assert lines[3].startswith(f"teacher.spec: {MISSING} is not on the Hugging Face hub") and "HF_TOKEN" in lines[3]
    assert "hf_test_token" not in proc.stdout + proc.stderr  # the secret is never echoed


# ---------------------------------------------------------------- no CUDA: refuse what would take days


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_llama_dir) -> Path:
    return tiny_llama_dir


def recipe(base: str, **train) -> Recipe:
    return Recipe.model_validate({"name": "dev", "model": {"base": base}, "train": train})


def test_qlora_without_cuda_is_refused_naming_the_build_the_driver_and_the_fix(tiny_base):
    assert torch.version.cuda is None  # this machine's torch is the CPU wheel
    with pytest.raises(DistillError) as err:
        loading.check_training_device(recipe(str(tiny_base), method="qlora", quant={"load_in_4bit": True}))
    msg = str(err.value)
    assert (
        "no CUDA device" in msg and f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)" in msg
    )
    assert "NVIDIA driver" in msg and "the recipe is QLoRA" in msg
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cu126" in msg and "train.quant.on_cpu=skip" in msg
    # The recipe insisting: fp32 LoRA instead, or real 4-bit on the CPU.
    for on_cpu in ("skip", "run"):
        loading.check_training_device(
            recipe(str(tiny_base), method="qlora", quant={"load_in_4bit": True, "on_cpu": on_cpu})
        )


def test_a_7b_base_without_cuda_is_refused_unless_the_recipe_says_so():
    seven_b = recipe("mistralai/Mistral-7B-Instruct-v0.3")  # offline: sized from the planner's table
    with pytest.raises(DistillError, match=r"has 7\.2B parameters, over train\.max_cpu_params=1e\+09"):
        loading.check_training_device(seven_b)
    loading.check_training_device(recipe("mistralai/Mistral-7B-Instruct-v0.3", max_cpu_params=None))
    loading.check_training_device(recipe("mistralai/Mistral-7B-Instruct-v0.3", max_cpu_params=10**10))


def test_distill_run_refuses_the_flagship_on_a_cpu_before_capture(tmp_path, capsys):
    runs = tmp_path / "runs"
    csv = tmp_path / "train.csv"
    csv.write_text("text,category\nwhere is my card,card_arrival\n")
    code = main(
        [
            "run",
            "mistral7b",
            f"teacher.spec=logs:{csv}",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
            "--runs-dir",
            str(runs),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "refusing because the recipe is QLoRA" in err
    assert "7.2B parameters" in err and not (runs / "mistral7b" / "capture").exists()


def test_the_finetune_stage_refuses_before_loading_anything(tiny_base, monkeypatch, tmp_path):
    from pipeline.stages import finetune
    from pipeline.tracking import NullTracker

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    with pytest.raises(DistillError, match="refusing because the recipe is QLoRA"):
        finetune.run(
            recipe(str(tiny_base), method="qlora", quant={"load_in_4bit": True}),
            {"curate": tmp_path},
            tmp_path / "out",
            NullTracker(),
        )


# ---------------------------------------------------------------- several GPUs, no launcher


@pytest.fixture
def four_gpus(monkeypatch):
    """The device count faked: nothing here can show four GPUs, and nothing reaches CUDA before the check."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_several_gpus_in_one_process_are_refused_with_the_launch_command(four_gpus, tiny_base):
    with pytest.raises(DistillError) as err:
        loading.check_training_device(recipe(str(tiny_base)).model_copy(update={"name": "banking"}))
    msg = str(err.value)
    assert "4 GPUs are visible to one process" in msg and "DataParallel" in msg
    assert "CUDA_VISIBLE_DEVICES=0 distill finetune banking" in msg
    assert (
        "accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 4 -m pipeline finetune banking"
        in msg
    )
    loading.check_training_device(recipe(str(tiny_base)), num_processes=4)  # under the launcher: one GPU per rank


def test_distill_run_refuses_several_gpus_before_capture(four_gpus, tmp_path, capsys):
    csv = tmp_path / "train.csv"
    csv.write_text("text,category\nwhere is my card,card_arrival\n")
    code = main(
        [
            "run",
            "mistral7b",
            f"teacher.spec=logs:{csv}",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "accelerate launch" in err and not (tmp_path / "runs" / "mistral7b" / "capture").exists()


# ---------------------------------------------------------------- memory between stages, loads onto the device


def test_a_stages_model_is_freed_when_the_stage_ends(tiny_base, tmp_path, monkeypatch):
    """The finetune stage run by the runner; automatic collection off, so only what the runner itself
    frees is freed: the Trainer and accelerate leave cycles that `del` alone does not break."""
    from datasets import Dataset, DatasetDict

    from pipeline.artifacts import Manifest, RunLayout, hash_outputs, write_manifest
    from pipeline.runner import run_stage
    from pipeline.stages import finetune
    from pipeline.tracking import NullTracker

    layout = RunLayout(tmp_path / "runs", "mem")
    curate = layout.stage_dir("curate")
    rows = [{"id": str(i), "prompt": f"my card {i} has not arrived", "completion": "card_arrival"} for i in range(12)]
    DatasetDict(
        {
            "train": Dataset.from_list(rows[:8]),
            "validation": Dataset.from_list(rows[8:]),
            "test": Dataset.from_list(rows[8:]),
        }
    ).save_to_disk(str(curate / "dataset"))
    write_manifest(curate, Manifest(stage="curate", outputs=hash_outputs(curate)))
    models = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: models.append(weakref.ref(m := real(*a, **k))) or m)
    cfg = recipe(str(tiny_base), max_steps=2, batch_size=4, logging_steps=1, max_seq_len=64, eos_check="off")
    gc.collect()
    gc.disable()
    try:
        outcome = run_stage(finetune, cfg, layout, NullTracker())
        alive = [ref() is not None for ref in models]
    finally:
        gc.enable()
    assert outcome.manifest.counts["steps"] == 2 and len(models) == 1
    assert alive == [False], "the finetune stage's model outlived the stage"


def test_cuda_loads_go_straight_to_this_ranks_gpu_in_the_compute_dtype(monkeypatch):
    from pipeline.config import QuantConfig

    bf16 = DevicePlan("cuda", "bfloat16", False, "cuda")
    assert loading.load_kwargs(bf16) == {"dtype": torch.bfloat16, "device_map": {"": "cuda:0"}}
    monkeypatch.setenv("LOCAL_RANK", "1")
    nf4 = loading.load_kwargs(DevicePlan("cuda", "bfloat16", True, "cuda"), QuantConfig(load_in_4bit=True), "sdpa")
    assert nf4["device_map"] == {"": "cuda:1"} and nf4["attn_implementation"] == "sdpa"
    assert nf4["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    assert loading.load_kwargs(DevicePlan("cpu", "float32", False, "cpu")) == {"dtype": torch.float32}
    assert loading.load_kwargs(DevicePlan("cpu", "float32", True, "cpu"), QuantConfig(load_in_4bit=True))[
        "device_map"
    ] == {"": "cpu"}


def test_device_plan_can_be_pinned_to_the_cpu(four_gpus):
    """CPU rehearsals pin the CPU, so on a CUDA box they test what they say."""
    from pipeline.llm.loading import device_plan

    plan = device_plan(device="cpu")
    assert plan.device == "cpu" and plan.dtype_name == "float32"


# ---------------------------------------------------------------- GGUF on a 7B: offload, parity limit, disk


def test_gguf_offloads_every_layer_only_where_llama_cpp_has_a_gpu():
    import llama_cpp

    from pipeline.llm.gguf_runtime import gpu_layers

    assert gpu_layers() == (-1 if llama_cpp.llama_supports_gpu_offload() else 0)
    assert Recipe(name="t").export.parity_limit == 200


def test_export_says_the_disk_a_7b_needs_and_refuses_when_it_is_not_free(tmp_path):
    from pipeline.stages.export import check_disk, disk_needed

    flagship = load_recipe("mistral7b", root=ROOT)
    needs = disk_needed(flagship, DevicePlan("cuda", "bfloat16", False, "cuda"), torch.bfloat16)
    assert needs["merged (bfloat16)"] == pytest.approx(14.5e9, rel=0.01)
    assert "gguf f16" in needs and sum(needs.values()) > 30e9
    with pytest.raises(
        DistillError,
        match=r"export: needs about .* GB of disk \(merged \(bfloat16\) .* GB, \+10%\) under .* only .* GB is free",
    ):
        check_disk(tmp_path, {"merged (bfloat16)": 1e18})
