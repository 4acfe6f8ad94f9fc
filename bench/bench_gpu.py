"""The GPU tier as a bench: QLoRA at the mistral7b shape, tokens/s, peak VRAM, planner vs measured.

    .venv/bin/python bench/bench_gpu.py [--quick]        (make bench-gpu)

Without CUDA it says so and exits 0, writing nothing (the committed results stay as they are).
With CUDA it runs the `gpu` tests (tests/test_gpu.py: random weights at the exact
Mistral-7B-Instruct-v0.3 shape, recipes/mistral7b.yaml's train section, a few steps at
seq 2048), which write bench/gpu.json before asserting; that record gets the envelope and
figures (bench/harness.py) and moves to bench/results/gpu.json, then the pytest exit status
is this script's. --quick changes nothing here: the tier is already a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import harness  # noqa: E402

RAW = ROOT / "bench" / "gpu.json"  # where tests/test_gpu.py writes its record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"bench-gpu: torch {torch.__version__} sees no CUDA device: skipped, nothing written "
              "(a CPU wheel? the Makefile's TORCH_SPEC picks the build)")
        return 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    RAW.unlink(missing_ok=True)
    rc = subprocess.call([sys.executable, "-m", "pytest", "-v", "-s", "-m", "gpu", "tests/test_gpu.py"],
                         cwd=ROOT, env=env)
    if not RAW.exists():
        print(f"bench-gpu: tests/test_gpu.py wrote no {RAW.relative_to(ROOT)} (pytest exit {rc})")
        return rc or 1
    record = json.loads(RAW.read_text())
    record["pytest_exit"] = rc
    harness.write("gpu", record, args)
    RAW.unlink()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
