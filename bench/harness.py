"""What every bench script shares: the quick switch, where results go, and the envelope.

Each `bench/bench_<name>.py` measures, then calls `write(name, result, args)`, which adds

    envelope: machine (arch, CPU model, cores, affinity / pinning, RAM, torch threads, GPU),
              load average at start and end, package versions, git commit, the exact command,
              whether it was a quick run, start time and wall time
    figures:  every figure as {name, value, unit, better, baseline, baseline_name, ratio}
              (figures.py turns a result into these; ratio = value / baseline)

and writes bench/results/<name>.json (bench/results-quick/ for quick runs, git-ignored, so a
short run never overwrites a committed measurement). `bench/report.py` renders them.

Quick: `--quick`, or BENCH_QUICK=1 in the environment (what `BENCH_QUICK=1 make bench` sets).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
QUICK_RESULTS = ROOT / "bench" / "results-quick"
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "llama-cpp-python",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "sentence-transformers",
    "fastapi",
    "uvicorn",
    "xgrammar",
    "llguidance",
    "outlines-core",
)
_STARTED: dict[str, float | tuple] = {}


def quick_from_env() -> bool:
    return os.environ.get("BENCH_QUICK", "").strip() not in ("", "0", "false", "no")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--quick and --out-dir / --out, the same on every script. Also starts the clock and load average."""
    parser.add_argument(
        "--quick",
        action="store_true",
        default=quick_from_env(),
        help="tiny sizes, a few seconds to a minute (default: BENCH_QUICK=1 in the environment)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for <name>.json (default bench/results, or bench/results-quick with --quick)",
    )
    parser.add_argument("--out", type=Path, default=None, help="the JSON file itself (overrides --out-dir)")
    start()


def start() -> None:
    """Record the start: wall clock and load average (called by add_arguments, before any work)."""
    if "time" not in _STARTED:
        _STARTED["time"] = time.time()
        _STARTED["perf"] = time.perf_counter()
        _STARTED["loadavg"] = os.getloadavg()


def out_path(args: argparse.Namespace, name: str) -> Path:
    if args.out is not None:
        return args.out
    folder = args.out_dir or (QUICK_RESULTS if args.quick else RESULTS)
    return folder / f"{name}.json"


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["python"] = platform.python_version()
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict:
    cores = os.cpu_count()
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info = {
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "os": platform.platform(terse=True),
        "cores": cores,
        "affinity": affinity,
        "pinned": affinity is not None and cores is not None and len(affinity) < cores,
        "ram_gib": _ram_gib(),
        "torch_threads": None,
        "gpu": None,
    }
    torch = sys.modules.get("torch")  # only when the bench used torch: importing it here costs seconds
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git() -> dict:
    def out(*cmd: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = out("status", "--porcelain", "--untracked-files=no")
    return {"commit": out("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def command(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *argv[1:]])


def envelope(quick: bool) -> dict:
    start()
    return {
        "command": command(),
        "quick": quick,
        "started_at": dt.datetime.fromtimestamp(_STARTED["time"], dt.UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - _STARTED["perf"], 1),
        "load_average": {
            "start": [round(v, 2) for v in _STARTED["loadavg"]],
            "end": [round(v, 2) for v in os.getloadavg()],
        },
        "machine": machine(),
        "versions": versions(),
        "git": git(),
    }


def write(name: str, result: dict, args: argparse.Namespace) -> Path:
    """The result plus `envelope` and `figures`, written atomically to out_path(args, name)."""
    from figures import figures_for  # bench/ is sys.path[0] when a bench script runs

    document = {**result, "envelope": envelope(args.quick), "figures": figures_for(name, result)}
    path = out_path(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def exit_with(main: Callable[[], int]) -> None:
    """Run a bench script's main; a DistillError (bad recipe, missing rounds) is one line and exit 1."""
    from pipeline.errors import DistillError

    try:
        sys.exit(main())
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
