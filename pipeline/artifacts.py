"""Run directory layout, manifests, atomic writes and content hashes.

A stage writes into `runs/<name>/<stage>.partial/`; the runner renames it to
`runs/<name>/<stage>/` once `manifest.json` (always written last) is there. A folder
without a manifest is incomplete by definition and is never read downstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.txt"
RESOLVED_CONFIG = "resolved_config.yaml"

# Artifact names: the contract between the stage that writes one and whatever reads it.
# Stages never import each other, so the names live here, grouped by the writing stage.
SPLITS = ("train", "validation", "test")
CAPTURE_RECORDS = "teacher.jsonl"  # capture
CURATED_DATASET = "dataset"  # curate: datasets.DatasetDict with SPLITS
FINETUNE_ADAPTER = "adapter"  # finetune: PEFT adapter + tokenizer
EVAL_REPORT = "report.json"  # evaluate
EVAL_POLICY = "router_policy.json"  # evaluate: the router's Policy (pipeline.llm.policy)
EXPORT_MERGED = "merged"  # export: plain transformers folder
EXPORT_GGUF = "gguf"  # export: model-<type>.gguf files and the Modelfile


def gguf_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


class Manifest(BaseModel):
    stage: str
    fingerprint: str = Field("", description="Hash of the stage's config and its inputs' hashes.")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    inputs: dict[str, str] = Field(default_factory=dict, description="input name -> content hash")
    outputs: dict[str, str] = Field(default_factory=dict, description="relative path -> content hash")
    counts: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    cost_usd: float = 0.0
    wall_s: float = 0.0
    notes: list[str] = Field(default_factory=list)
    student_input: str | None = Field(
        None,
        description="export: what the shipped student reads (conversation | user), as it was trained and "
        "evaluated; the router refuses a policy that says otherwise.",
    )


# ---------------------------------------------------------------- hashing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def hash_outputs(folder: Path) -> dict[str, str]:
    """Content hash of every file under folder (the manifest itself excluded)."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, FINGERPRINT)
    }


# ---------------------------------------------------------------- atomic writes


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file beside path, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside final; on success it replaces final in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, final: Path) -> None:
    """Move src to final, removing an older final first (the move itself is one rename)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(src, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, final)


# ---------------------------------------------------------------- run layout


class RunLayout:
    """runs/<name>/<stage>/ with a manifest per stage; runs/latest points at the newest run."""

    def __init__(self, runs_root: Path, name: str):
        self.root = runs_root / name
        self.runs_root = runs_root

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def partial_dir(self, stage: str) -> Path:
        return self.root / f"{stage}.partial"

    def point_latest(self) -> None:
        link = self.runs_root / "latest"
        tmp = self.runs_root / ".latest.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.root.name)
        os.replace(tmp, link)


def read_manifest(stage_dir: Path) -> Manifest | None:
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    from pydantic import ValidationError

    from pipeline.errors import DistillError

    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as err:
        # A hand-edited or half-copied manifest: say which file, not a pydantic dump.
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise DistillError(
            f"{path}: not a valid manifest ({where}: {first['msg']}); delete {stage_dir} to redo that stage"
        ) from None


def finished_manifest(stage_dir: Path) -> Manifest:
    """The manifest of a stage known to have completed there (an upstream the runner resolved, a
    stage just run): its absence is refused with the folder named."""
    from pipeline.errors import DistillError

    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise DistillError(f"{stage_dir}: no {MANIFEST}, so that stage has not completed there")
    return manifest


def completed_stage(run_dir: Path, stage: str, artifact: str) -> Path:
    """`artifact` of a finished stage, found through its manifest: a folder without one is
    incomplete and refused, and so is an artifact its manifest does not list."""
    from pipeline.errors import DistillError

    folder = Path(run_dir) / stage
    manifest = read_manifest(folder)
    if manifest is None:
        raise DistillError(f"{folder}: no {MANIFEST}, so {stage} has not completed there; run `distill {stage}` first")
    if not any(name == artifact or name.startswith(f"{artifact}/") for name in manifest.outputs):
        raise DistillError(f"{folder / MANIFEST}: lists no '{artifact}'; rerun `distill {stage} --force`")
    return folder / artifact


def write_manifest(stage_dir: Path, manifest: Manifest) -> None:
    atomic_write_text(stage_dir / MANIFEST, manifest.model_dump_json(indent=2) + "\n")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record); a broken line is an error naming the file and line."""
    from pipeline.errors import DistillError

    if not Path(path).is_file():
        raise DistillError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DistillError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DistillError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in iter_jsonl(path)]
