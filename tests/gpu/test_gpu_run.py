"""The first GPU run's CPU part: the wheelhouse's trimming, and bench/gpu_run.sh end to end on the
CPU (venv with the system's packages, offline install from a wheelhouse, then bench/bench_gpu.py's
preflight and A10G-export emulation at a tiny shape). What needs the GPU runs there (docs/gpu.md).

    .venv/bin/pytest -q tests/gpu/test_gpu_run.py
"""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_wheel(path: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel: the files, METADATA, WHEEL and a RECORD listing them all."""
    dist = f"{name}-{version}.dist-info"
    files = {
        **members,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    wheel = path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f, data in files.items():
            z.writestr(f, data)
        z.writestr(f"{dist}/RECORD", record)
    return wheel


def test_trimming_drops_the_unused_libraries_and_their_record_lines(tmp_path):
    wheelhouse = bench_module("wheelhouse")
    libs = {
        f"bitsandbytes/libbitsandbytes_{v}.so": b"x" * 1000
        for v in ("cpu", "cuda118", "cuda124", "cuda128", "cuda130", "rocm64", "xpu2025")
    }
    wheel = write_wheel(tmp_path, "bitsandbytes", "0.50.2", {"bitsandbytes/__init__.py": b"", **libs})
    saved = wheelhouse.trim_wheel(wheel, wheelhouse.bnb_trim(["124", "130"]))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = {n.split("_", 1)[1] for n in names if n.startswith("bitsandbytes/libbitsandbytes_")}
    assert kept == {"cpu.so", "cuda124.so", "cuda130.so"} and saved > 0
    assert "cuda118" not in record and "rocm64" not in record and "cuda124" in record
    assert "pyarrow/libarrow_flight.so*" in wheelhouse.TRIM["pyarrow"]
    assert {"trl", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic"} <= set(wheelhouse.PACKAGES)
    assert all("==" in pin for pin in wheelhouse.pins())  # exact versions: the ones tested here


def run_script(tmp_path: Path, wheelhouse: Path, *args: str) -> subprocess.CompletedProcess:
    # The shared venv's packages stand in for the GPU node's system site-packages (torch, transformers).
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "WHEELHOUSE": str(wheelhouse),
        "GPU_VENV": str(tmp_path / "venv"),
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_run.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_gpu_run_without_a_wheelhouse_says_how_to_make_one(tmp_path):
    proc = run_script(tmp_path, tmp_path / "nowhere", "--cpu-rehearsal")
    assert proc.returncode == 2 and "make gpu-wheelhouse" in proc.stderr


def test_gpu_run_installs_offline_then_rehearses_preflight_and_the_capped_export_on_cpu(tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    write_wheel(wheelhouse, "distill_gpu_probe", "0.1", {"distill_gpu_probe/__init__.py": b"READY = True\n"})
    (wheelhouse / "requirements.txt").write_text("distill-gpu-probe==0.1\n")
    out = tmp_path / "gpu.json"
    proc = run_script(tmp_path, wheelhouse, "--cpu-rehearsal", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "python"), "-c", "import distill_gpu_probe"], capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr  # installed into the venv from the wheelhouse, no index
    record = json.loads(out.read_text())
    assert record["preflight"]["cuda_available"] is False and record["preflight"]["trl"]
    export = record["export_a10g"]
    assert export["passed"] and export["check"] == "passed" and export["copies_alive_at_reload"] < 1.5
    assert set(record["steps"]) == {"preflight", "export_a10g"} and record["failed_steps"] == []
    assert record["envelope"]["command"].startswith("python bench/bench_gpu.py --cpu-rehearsal")
