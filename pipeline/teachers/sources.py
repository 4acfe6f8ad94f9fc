"""Read prompt and log tables: JSONL, CSV, Parquet, a folder `datasets` saved with `save_to_disk`,
or anything `datasets.load_dataset` reads (a hub id such as `PolyAI/banking77`, which needs the
hub: offline, the error says to pass a file); a table at an https:// URL is downloaded once into
DISTILL_CACHE/downloads (`fetch`).

Used by the capture stage (`distill capture RECIPE`). Every row comes with where it came
from (`file:line` for JSONL and CSV, `file row N` otherwise) so an error can point at it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.artifacts import iter_jsonl
from pipeline.errors import DistillError

TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet", ".json")


def is_table_file(path: Path | str) -> bool:
    """Files we hash as stage inputs; a folder, hub id or URL is named only (by the spec the fingerprint covers)."""
    if is_url(str(path)):
        return False
    return Path(path).suffix.lower() in TABLE_SUFFIXES or Path(path).is_file()


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


def fetch(url: str, timeout_s: float = 60.0) -> Path:
    """A table published at a URL (a dataset's own CSV), downloaded once into DISTILL_CACHE/downloads
    and read from there after: the project never commits the data, and a rerun needs no network."""
    import hashlib
    import os
    import urllib.error
    import urllib.request

    from pipeline.llm.loading import cache_root

    name = Path(url.split("?", 1)[0]).name or "download"
    target = cache_root() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise DistillError(
            f"{url}: could not download it ({getattr(err, 'reason', err)}); without network, download "
            "it elsewhere and pass the local file (e.g. teacher.spec=logs:data/train.csv)"
        ) from None
    os.replace(tmp, target)
    return target


def read_rows(source: Path | str, split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, row) for every record in the source, in order."""
    if is_url(str(source)):
        source = fetch(str(source))
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES and not path.is_file():
        raise DistillError(f"{path}: file not found")
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path, split)
    else:
        yield from _datasets_rows(str(source), split)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    _check_utf8(path)
    for lineno, record in iter_jsonl(path):
        yield f"{path}:{lineno}", record


def _check_utf8(path: Path) -> None:
    """Name the line and byte of the first non-UTF-8 byte: a text reader decodes in 8 KiB
    chunks, so its error points nowhere a user can look."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DistillError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{line[err.start]:02x} at column "
                    f"{err.start + 1}); save the file as UTF-8"
                ) from None


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    _check_utf8(path)
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise
    # become part of the first column's name.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            # A row with more cells than the header puts the extras under None: say so, not guess.
            if None in row:
                raise DistillError(f"{path}:{reader.line_num}: more cells than header columns")
            _check_no_nul(path, reader.line_num, row)
            yield f"{path}:{reader.line_num}", row


def _check_no_nul(path: Path, line: int, row: dict) -> None:
    # Python's csv module passes NUL through; a NUL in a text cell is a UTF-16 export or a
    # binary file, never a prompt.
    bad = next((column for column, cell in row.items() if "\x00" in (cell or "") or "\x00" in column), None)
    if bad is not None:
        raise DistillError(
            f"{path}:{line}: NUL byte in column '{bad.strip(chr(0))}' (a UTF-16 or binary file? save it as UTF-8 CSV)"
        )


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield f"{path} row {row}", record
    except (pyarrow.ArrowException, OSError) as err:
        raise DistillError(
            f"{path}: not a readable Parquet file after row {row} ({type(err).__name__}: {err})"
        ) from None


def _json_rows(path: Path, split: str) -> Iterator[tuple[str, dict]]:
    """A .json file: an array of records (what json.dump writes), else JSON Lines, else
    whatever datasets' json loader makes of it (e.g. {"data": [...]})."""
    _check_utf8(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise DistillError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        yield from _jsonl_rows(path)  # a whole value, then more: JSON Lines saved as .json
        return
    if isinstance(data, list):
        for i, record in enumerate(data, start=1):
            if not isinstance(record, dict):
                raise DistillError(f"{path}: item {i} is a {type(record).__name__}, expected a JSON object")
            yield f"{path} row {i}", record
        return
    yield from _datasets_rows(str(path), split)


def _datasets_rows(source: str, split: str) -> Iterator[tuple[str, dict]]:
    """A hub dataset id (`PolyAI/banking77`), a dataset folder, or a .json datasets reads.
    Integer class-label columns come back as their names: a label is text everywhere else."""
    import datasets

    try:
        if _saved_dataset(Path(source)):
            data = datasets.load_from_disk(source)
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DistillError(f"{source}: no split '{split}' (it has {', '.join(data)})")
                data = data[split]
        elif source.endswith(".json"):
            data = datasets.load_dataset("json", data_files=source, split=split)
        else:
            data = datasets.load_dataset(source, split=split)
    except ConnectionError as err:  # datasets' own, raised offline (HF_HUB_OFFLINE) or when the hub is unreachable
        raise DistillError(
            f"{source}: not a local file, and the Hugging Face hub could not be reached to download it "
            f"({err}); offline, download it elsewhere and pass the local file instead (a CSV, JSONL or "
            "Parquet path, e.g. teacher.spec=logs:data/train.csv or capture.prompts=data/prompts.csv)"
        ) from None
    except (
        FileNotFoundError,
        ValueError,
        datasets.exceptions.DatasetNotFoundError,
        datasets.exceptions.DatasetGenerationError,
    ) as err:
        raise DistillError(f"{source}: datasets.load_dataset could not read it ({type(err).__name__}: {err})") from None
    names = class_label_names(data.features)
    for i, record in enumerate(data, start=1):
        yield f"{source} row {i}", _with_label_names(record, names)


def _saved_dataset(path: Path) -> bool:
    """A folder `Dataset.save_to_disk` / `DatasetDict.save_to_disk` wrote (load_dataset cannot read it)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def class_label_names(features) -> dict[str, list[str]]:
    """Column -> label names, for every `datasets.ClassLabel` column (stored as integers)."""
    import datasets

    return {column: feature.names for column, feature in features.items() if isinstance(feature, datasets.ClassLabel)}


def _with_label_names(record: dict, names: dict[str, list[str]]) -> dict:
    if not names:
        return record
    # -1 is datasets' "no label" (an unlabelled test split): no answer, so the importer rejects the row.
    return {
        **record,
        **{
            column: (labels[record[column]] if isinstance(record[column], int) and record[column] >= 0 else None)
            for column, labels in names.items()
        },
    }
