"""Reading data files into records, each named by file and location for error messages.

Supported: JSON Lines (.jsonl), JSON (.json: an array of objects, or JSON Lines), Parquet
(.parquet, needs pyarrow), CSV (.csv) and a directory saved by ``datasets.Dataset.save_to_disk``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

SUPPORTED = ".jsonl, .json, .parquet, .csv, or a directory saved by datasets"


@dataclass(frozen=True)
class Record:
    """One raw example with where it came from."""

    data: dict[str, Any]
    source: str
    location: str
    from_text: bool = False  # CSV: every value is a string

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, source=self.source, location=self.location, field=field)


def read_records(path: str | Path) -> list[Record]:
    """Read every record of a data file; raise DataError naming file and line on bad input."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", source=str(path))
    if path.is_dir():
        records = _read_saved_dataset(path)
    else:
        suffix = path.suffix.lower()
        readers = {
            ".jsonl": _read_jsonl,
            ".json": _read_json,
            ".parquet": _read_parquet,
            ".csv": _read_csv,
        }
        if suffix not in readers:
            raise DataError(
                f"unsupported file type {suffix or '(none)'!r}; use {SUPPORTED}", source=str(path)
            )
        records = readers[suffix](path)
    if not records:
        raise DataError("contains no records", source=str(path))
    return records


def _decode(path: Path, raw: bytes, line_no: int | None = None) -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        if line_no is None:
            line_no = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            "is not valid UTF-8", source=str(path), location=f"line {line_no}"
        ) from None


def _object(path: Path, value: Any, location: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(
            f"expected a JSON object, got {type(value).__name__}",
            source=str(path),
            location=location,
        )
    return value


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            text = _decode(path, raw, line_no).strip()
            if not text:
                continue
            location = f"line {line_no}"
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"invalid JSON: {exc.msg} (column {exc.colno})",
                    source=str(path),
                    location=location,
                ) from None
            records.append(Record(_object(path, value, location), str(path), location))
    return records


def _read_json(path: Path) -> list[Record]:
    text = _decode(path, path.read_bytes())
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON: {exc.msg}", source=str(path), location=f"line {exc.lineno}"
        ) from None
    return [
        Record(_object(path, v, f"record {i}"), str(path), f"record {i}")
        for i, v in enumerate(values, start=1)
    ]


def _read_csv(path: Path) -> list[Record]:
    text = _decode(path, path.read_bytes())
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # Line numbers count the header as line 1, as an editor shows them.
    return [
        Record(dict(row), str(path), f"line {reader.line_num}", from_text=True) for row in reader
    ]


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "reading Parquet needs pyarrow: pip install 'align-core[parquet]'", source=str(path)
        ) from None
    rows = pq.read_table(path).to_pylist()
    return [Record(row, str(path), f"record {i}") for i, row in enumerate(rows, start=1)]


def _read_saved_dataset(path: Path) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"is a directory; reading a saved dataset needs `datasets` "
            f"(pip install 'align-core[datasets]'), or use {SUPPORTED}",
            source=str(path),
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"is not a saved dataset: {exc}", source=str(path)) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(f"{path}/{name}" for name in loaded)
        raise DataError(f"holds several splits; pass one of: {splits}", source=str(path))
    return [Record(row, str(path), f"record {i}") for i, row in enumerate(loaded, start=1)]


def fingerprint(path: str | Path) -> str:
    """sha256 of a data file's bytes; for a dataset directory, of every file's name and bytes."""
    import hashlib

    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", source=str(path))
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
