"""The wheels the GPU tier needs on an offline GPU node that already has Python, a CUDA torch and
transformers: trl, peft, accelerate, bitsandbytes, datasets, pydantic and what they pull in beyond
those, at the versions this project is tested with, trimmed to fit what such a node lets in.

    make gpu-wheelhouse                      (.gpu-wheelhouse/, for CPython 3.12, manylinux x86_64)
    .venv/bin/python bench/wheelhouse.py --out DIR [--python 3.12] [--bnb-cuda "124 130"] [--limit-mib 64]

Trimmed, because two wheels alone exceed 64 MiB: bitsandbytes keeps only the CUDA libraries named by
--bnb-cuda (it loads libbitsandbytes_cuda<torch.version.cuda>.so; BNB_CUDA_VERSION picks another, which
bench/gpu_run.sh sets when the exact one was trimmed away), pyarrow drops Arrow Flight (an RPC
library nothing here imports), its headers, Cython sources and tests, and pandas its tests. A
trimmed wheel's RECORD lists what it still holds. Writes requirements.txt (exact pins) beside the
wheels (and python-version) and fails, naming the largest wheels, when the folder is over --limit-mib.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# What the GPU tier imports beyond torch + transformers (and their own dependencies), with the
# dependencies of those that such a node may lack. Versions: the ones installed here, i.e. tested.
PACKAGES = (
    "trl",
    "peft",
    "accelerate",
    "bitsandbytes",
    "datasets",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "pyarrow",
    "pandas",
    "python-dateutil",
    "six",
    "dill",
    "multiprocess",
    "xxhash",
    "fsspec",
    "psutil",
    "pytest",
    "pluggy",
    "iniconfig",
)
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")
# Members dropped from each wheel (fnmatch patterns on the path inside the wheel).
TRIM = {
    "pyarrow": (
        "pyarrow/libarrow_flight.so*",
        "pyarrow/_flight.*",
        "pyarrow/include/*",
        "pyarrow/tests/*",
        "pyarrow/src/*",
        "pyarrow/includes/*",
        "pyarrow/*.pxd",
        "pyarrow/*.pyx",
        "pyarrow/*.pxi",
        # two more copies of libarrow_python.so.2500 (symlinks in a build tree, files in a zip)
        "pyarrow/libarrow_python.so",
        "pyarrow/libarrow_python.so.*.*.*",
    ),
    "pandas": ("pandas/tests/*",),
}


def bnb_trim(keep_cuda: list[str]) -> tuple[str, ...]:
    """Every native library but the CPU one and the CUDA versions kept."""
    return (
        "bitsandbytes/libbitsandbytes_rocm*",
        "bitsandbytes/libbitsandbytes_xpu*",
        *[f"!bitsandbytes/libbitsandbytes_cuda{v}.so" for v in keep_cuda],
        "bitsandbytes/libbitsandbytes_cuda*",
    )


def pins(packages=PACKAGES) -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in packages]


def download(requirements: list[str], dest: Path, python: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--dest",
        str(dest),
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        f"cp{python.replace('.', '')}",
        *[arg for p in PLATFORMS for arg in ("--platform", p)],
        *requirements,
    ]
    subprocess.run(cmd, check=True)


def trim_wheel(wheel: Path, patterns: tuple[str, ...]) -> int:
    """Rewrite `wheel` without the members matching `patterns` ("!pattern" keeps a member an
    earlier-or-later pattern would drop); returns the bytes saved."""
    keep_rules = [p[1:] for p in patterns if p.startswith("!")]
    drop_rules = [p for p in patterns if not p.startswith("!")]

    def dropped(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in drop_rules) and not any(
            fnmatch.fnmatch(name, p) for p in keep_rules
        )

    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        gone = {i.filename for i in src.infolist() if dropped(i.filename)}
        for info in src.infolist():
            if info.filename in gone:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if line.split(",", 1)[0] not in gone]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--python", default="3.12", help="the GPU node's Python (major.minor)")
    parser.add_argument(
        "--bnb-cuda",
        default="124 130",
        help="bitsandbytes CUDA libraries to keep, e.g. '124 130' (one per CUDA major the node may have)",
    )
    parser.add_argument("--limit-mib", type=float, default=64.0)
    args = parser.parse_args(argv)

    requirements = pins()
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.parent.exists() else None) as tmp:
        staging = Path(tmp) / "wheels"
        staging.mkdir()
        download(requirements, staging, args.python)
        rules = TRIM | {"bitsandbytes": bnb_trim(args.bnb_cuda.split())}
        for wheel in sorted(staging.glob("*.whl")):
            project = wheel.name.split("-")[0].lower()
            if project in rules:
                saved = trim_wheel(wheel, rules[project])
                print(f"trimmed {wheel.name}: -{saved / 2**20:.1f} MiB")
        (staging / "requirements.txt").write_text("\n".join(requirements) + "\n")
        (staging / "python-version").write_text(args.python + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.move(str(staging), args.out)
    wheels = sorted(args.out.glob("*.whl"), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in wheels) / 2**20
    print(
        f"{args.out}: {len(wheels)} wheels, {total:.1f} MiB (limit {args.limit_mib:g} MiB), for CPython {args.python}"
    )
    if total > args.limit_mib:
        largest = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in wheels[:4])
        print(
            f"gpu-wheelhouse: {total - args.limit_mib:.1f} MiB over the limit; largest: {largest}. Keep fewer "
            "bitsandbytes CUDA libraries (BNB_CUDA=124) or bring the rest another way",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
