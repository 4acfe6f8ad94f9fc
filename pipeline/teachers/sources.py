"""Read prompt and log tables: JSONL, CSV, Parquet, or anything `datasets.load_dataset` reads.

Used by the capture stage (`distill capture RECIPE`). Every row comes with where it came
from (`file:line` for JSONL and CSV, `file row N` otherwise) so an error can point at it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

from pipeline.artifacts import iter_jsonl
from pipeline.errors import DistillError

TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet", ".json")


def is_table_file(path: Path) -> bool:
    """Files we hash as stage inputs; a folder or hub id goes through datasets and is named only."""
    return Path(path).suffix.lower() in TABLE_SUFFIXES or Path(path).is_file()


def read_rows(source: Path | str, split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, row) for every record in the source, in order."""
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
    else:
        yield from _datasets_rows(str(source), split)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    for lineno, record in iter_jsonl(path):
        yield f"{path}:{lineno}", record


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            # A row with more cells than the header puts the extras under None: say so, not guess.
            if None in row:
                raise DistillError(f"{path}:{reader.line_num}: more cells than header columns")
            yield f"{path}:{reader.line_num}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", record


def _datasets_rows(source: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        if source.endswith(".json"):
            data = datasets.load_dataset("json", data_files=source, split=split)
        else:
            data = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DistillError(f"{source}: datasets.load_dataset could not read it ({type(err).__name__}: {err})") from None
    for i, record in enumerate(data, start=1):
        yield f"{source} row {i}", record
