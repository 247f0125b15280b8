"""Reading data files into records, each named by file and location for error messages.

Supported: JSON Lines (.jsonl), JSON (.json: an array of objects, or JSON Lines), Parquet
(.parquet, needs pyarrow), CSV (.csv) and a directory saved by ``datasets.Dataset.save_to_disk``.
A malformed file (a CSV row with the wrong number of fields or a quote left open, JSON nested
too deeply, a lone surrogate, a corrupt Parquet file) is a DataError naming file and line.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from ..errors import DataError

SUPPORTED = ".jsonl, .json, .parquet, .csv, or a directory saved by datasets"

# csv refuses fields over 128 KiB by default, but a long completion is data. 2**31 - 1 is the
# largest limit every platform accepts (it is a C long, 32 bits on Windows).
CSV_FIELD_LIMIT = 2**31 - 1

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800 to \udfff in JSON text
_JSON_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # strings are skipped whole


@dataclass(frozen=True)
class Record:
    """One raw example with where it came from."""

    data: dict[str, Any]
    source: str
    location: str
    from_text: bool = False  # CSV: every value is a string
    renamed: tuple[tuple[str, str], ...] = ()  # (column as read, as the data has it)

    def error(self, message: str, field: str | None = None) -> DataError:
        if field is not None:
            for new, old in self.renamed:  # name the field as the data names it
                if field == new or field.startswith((f"{new}.", f"{new}[")):
                    field = old + field[len(new) :]
                    break
        return DataError(message, source=self.source, location=self.location, field=field)


def read_records(path: str | Path) -> list[Record]:
    """Read every record of a data file; raise DataError naming file and line on bad input."""
    return list(iter_records(path))


def iter_records(path: str | Path) -> Iterator[Record]:
    """The records of a data file one at a time: JSON Lines, Parquet and saved datasets are
    read as they are consumed, never all held; a JSON array and CSV are parsed whole first."""
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
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        raise DataError("contains no records", source=str(path))


def count_records(path: str | Path) -> int | None:
    """About how many records a file holds, cheaply (for a progress bar): JSON Lines' lines,
    Parquet's and saved datasets' rows; None where only parsing would tell."""
    path = Path(path)
    try:
        if path.is_dir():
            import datasets

            return len(datasets.load_from_disk(str(path)))
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if path.suffix.lower() == ".jsonl":
            lines, last = 0, b"\n"
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    lines += block.count(b"\n")
                    last = block[-1:]
            return lines + (last != b"\n")
    except Exception:  # a bad file is named by the reader, not here
        return None
    return None


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


# -- JSON -----------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            record = jsonl_record(path, line_no, raw)
            if record is not None:
                yield record


def jsonl_record(path: Path, line_no: int, raw: bytes) -> Record | None:
    """The record of one JSON Lines line (None for a blank line)."""
    text = _decode(path, raw, line_no).strip()
    if not text:
        return None
    location = f"line {line_no}"
    value = _parse_json(path, text, line_no)
    record = Record(_object(path, value, location), str(path), location)
    if _SURROGATE_ESCAPE.search(text):  # the only way in for a lone surrogate
        _check_unicode(record)
    return record


@dataclass(frozen=True)
class JsonLines:
    """Lines of a JSON Lines file, unparsed: what a tokenising worker is sent, so that parsing
    happens there and not in the one process that reads the file."""

    path: Path
    lines: list[tuple[int, bytes]]  # (line number, the line's bytes), blank lines left out
    columns: tuple[tuple[str, str], ...] = ()  # the column mapping, applied after parsing

    def records(self) -> list[Record]:
        found = [jsonl_record(self.path, number, raw) for number, raw in self.lines]
        mapping = dict(self.columns)
        return [rename_columns(r, mapping) if mapping else r for r in found if r is not None]


def rename_columns(record: Record, columns: dict[str, str]) -> Record:
    """The record with its columns renamed (``question`` → ``prompt``); errors about a renamed
    field name it as the file does."""
    data = {columns.get(key, key): value for key, value in record.data.items()}
    renamed = tuple((new, old) for old, new in columns.items() if old in record.data)
    return Record(data, record.source, record.location, record.from_text, renamed)


def jsonl_chunks(path: str | Path, size: int, columns: dict[str, str]) -> Iterator[JsonLines]:
    """A JSON Lines file in chunks of ``size`` non-blank lines, read but not parsed."""
    path = Path(path)
    mapping = tuple(columns.items())
    chunk: list[tuple[int, bytes]] = []
    empty = True
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if raw.isspace():
                continue
            chunk.append((line_no, raw))
            if len(chunk) == size:
                yield JsonLines(path, chunk, mapping)
                chunk, empty = [], False
    if chunk:
        yield JsonLines(path, chunk, mapping)
    elif empty:
        raise DataError("contains no records", source=str(path))


def _read_json(path: Path) -> Iterable[Record]:
    text = _decode(path, path.read_bytes())
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    records = [
        Record(_object(path, v, f"record {i}"), str(path), f"record {i}")
        for i, v in enumerate(_parse_json(path, text, 1), start=1)
    ]
    if _SURROGATE_ESCAPE.search(text):
        for record in records:
            _check_unicode(record)
    return records


def _parse_json(path: Path, text: str, first_line: int) -> Any:
    """``json.loads``, its errors located by line (``first_line`` is the text's first line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON: {exc.msg} (column {exc.colno})",
            source=str(path),
            location=f"line {first_line + exc.lineno - 1}",
        ) from None
    except RecursionError:
        raise _too_deep(path, text, first_line) from None
    except ValueError as exc:  # an integer of over 4300 digits, Python's limit
        raise DataError(
            f"invalid JSON: {exc}", source=str(path), location=f"line {first_line}"
        ) from None


def _too_deep(path: Path, text: str, first_line: int) -> DataError:
    """Python's JSON parser recurses once per level and, near the recursion limit, raises
    RecursionError without a position: count the levels and name the line where the nesting
    is deepest."""
    depth = deepest = at = 0
    for match in _JSON_BRACKETS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > deepest:
                deepest, at = depth, match.start()
        elif token in ("]", "}"):
            depth -= 1
    line = first_line + text.count("\n", 0, at)
    return DataError(
        f"JSON nested too deeply ({deepest} levels; Python's JSON parser stops near "
        f"{sys.getrecursionlimit()})",
        source=str(path),
        location=f"line {line}",
    )


def _check_unicode(record: Record) -> None:
    """Refuse a lone surrogate: JSON's ``\\ud800`` escape decodes to one, which is no Unicode
    text and crashes the tokenizer or any ``encode()`` later. UTF-8 bytes cannot hold one, so
    only JSON text with such an escape (or a pair of them: an emoji) needs this walk."""
    found = _lone_surrogate(record.data)
    if found is not None:
        field, text, in_key = found
        char = _SURROGATE.search(text).group()
        what = "the field name contains" if in_key else "contains"
        raise record.error(
            f"{what} a lone surrogate (\\u{ord(char):04x}), which is not valid Unicode text", field
        )


def _lone_surrogate(data: dict[str, Any]) -> tuple[str, str, bool] | None:
    """A string or key holding a lone surrogate, as (field, the string, whether a key), the
    field named like ``messages[1].content``. Iterative, so any depth the parser accepted is
    walked; ASCII strings cost a flag test, and names are made for containers and the culprit
    only (this runs on every record with an emoji written as an escape pair)."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        container, field = stack.pop()
        pairs = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in pairs:
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                return _child(field, key), key, True
            if isinstance(item, str):
                if not item.isascii() and _SURROGATE.search(item):
                    return _child(field, key), item, False
            elif isinstance(item, (dict, list)):
                stack.append((item, _child(field, key)))
    return None


def _child(field: str, key: str | int) -> str:
    """The name of a value inside ``field``: ``field.key`` or ``field[index]``."""
    if isinstance(key, int):
        return f"{field}[{key}]"
    return f"{field}.{key}" if field else key


# -- CSV ------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[Record]:
    """Rows under the header's column names. Each is located at the line where it starts, as an
    editor shows it (the header is line 1), and must have as many fields as the header."""
    lines = io.StringIO(_decode(path, path.read_bytes()), newline="").readlines()
    with _csv_field_limit(CSV_FIELD_LIMIT):
        rows = _csv_rows(path, lines)
        first = next(rows, None)
        if first is None:
            return []
        header = _csv_header(path, *first)
        return [_csv_record(path, header, line, row) for line, row in rows]


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Raise csv's process-wide field size limit while reading, then put it back."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _csv_rows(path: Path, lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, fields) for each row that is not blank. Strict, so a quote
    left open is an error rather than a field that swallows the lines after it."""
    reader = csv.reader(lines, strict=True)
    start = 1
    try:
        for row in reader:
            if row:
                yield start, row
            start = reader.line_num + 1
    except csv.Error as exc:
        raise _csv_error(path, lines, start, reader.line_num, exc) from None


def _csv_header(path: Path, line: int, names: list[str]) -> list[str]:
    """The column names; one given twice would silently hide the other's values."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(
                f"column {name!r} appears twice in the header",
                source=str(path),
                location=f"line {line}",
            )
        seen.add(name)
    return names


def _csv_record(path: Path, header: list[str], line: int, row: list[str]) -> Record:
    location = f"line {line}"
    if len(row) != len(header):
        raise DataError(
            f"{len(row)} field{'s' * (len(row) != 1)}, the header has {len(header)}",
            source=str(path),
            location=location,
        )
    return Record(dict(zip(header, row, strict=True)), str(path), location, from_text=True)


def _csv_error(path: Path, lines: list[str], start: int, end: int, exc: csv.Error) -> DataError:
    """csv stops where a record's quoting broke (``end``), which is often lines after the quote
    at fault: find that quote in the record's lines (``start`` to ``end``) and name its line."""
    lengths = list(accumulate(len(line) for line in lines[start - 1 : end]))

    def line_of(offset: int) -> int:
        return start + bisect_right(lengths, offset)

    problem = _quote_problem("".join(lines[start - 1 : end]))
    if problem is None:
        message, line = f"malformed CSV: {exc}", end
    elif problem[1] is None:
        message, line = "a quoted field opened here is never closed", line_of(problem[0])
    elif line_of(problem[1]) > line_of(problem[0]):
        message = (
            "a quoted field opened here is never closed "
            f"(the next quote, on line {line_of(problem[1])}, is followed by text)"
        )
        line = line_of(problem[0])
    else:
        message = 'text follows the closing quote of a quoted field (write a quote inside as "")'
        line = line_of(problem[1])
    return DataError(message, source=str(path), location=f"line {line}")


def _quote_problem(text: str) -> tuple[int, int | None] | None:
    """Where csv's strict quoting fails in ``text`` (which starts a record): the offsets of the
    opening quote and of the closing quote that text follows, or None for a quote never closed.
    None if the quoting is sound."""
    pos, field_start = 0, True
    while pos < len(text):
        if text[pos] == '"' and field_start:
            close = text.find('"', pos + 1)
            while close >= 0 and text.startswith('""', close):  # a doubled quote is a quote
                close = text.find('"', close + 2)
            if close < 0:
                return pos, None
            if text[close + 1 : close + 2] not in ("", ",", "\r", "\n"):
                return pos, close
            pos, field_start = close + 1, False
            continue
        field_start = text[pos] in ",\r\n"
        pos += 1
    return None


# -- Parquet and saved datasets -------------------------------------------------------------------
def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "reading Parquet needs pyarrow: pip install 'align-core[parquet]'", source=str(path)
        ) from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        number = 0
        for batch in batches:
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError:
                raise _undecodable(path, pa.Table.from_batches([batch]), number) from None
            for row in rows:
                number += 1
                yield Record(row, str(path), f"record {number}")
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"not a readable Parquet file: {_arrow_reason(exc)}", source=str(path)
        ) from None


def _arrow_reason(exc: Exception) -> str:
    """pyarrow's message on one line, without the file name the error line already gives."""
    text = " ".join(str(exc).split())
    return re.sub(r"^Could not open Parquet input source '.*?': ", "", text)


def _undecodable(path: Path, table: Any, before: int = 0) -> DataError:
    """Arrow does not check that stored strings are UTF-8, and Python's decoding of a bad one
    names no row: find the first (column by column, halving the rows) to name it."""

    def fails(column: Any, start: int, stop: int) -> bool:
        try:
            column.slice(start, stop - start).to_pylist()
        except UnicodeDecodeError:
            return True
        return False

    for name in table.column_names:
        column = table.column(name)
        low, high = 0, len(column)
        if not fails(column, low, high):
            continue
        while high - low > 1:  # rows low..high-1 hold the first bad one
            middle = (low + high) // 2
            low, high = (low, middle) if fails(column, low, middle) else (middle, high)
        return DataError(
            "is not valid UTF-8",
            source=str(path),
            location=f"record {before + low + 1}",
            field=name,
        )
    return DataError("is not valid UTF-8", source=str(path))


def _read_saved_dataset(path: Path) -> Iterator[Record]:
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
    except (OSError, ValueError) as exc:  # corrupt Arrow files or JSON metadata
        raise DataError(
            f"not a readable saved dataset: {_arrow_reason(exc)}", source=str(path)
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(f"{path}/{name}" for name in loaded)
        raise DataError(f"holds several splits; pass one of: {splits}", source=str(path))
    for i, row in enumerate(loaded, start=1):
        yield Record(row, str(path), f"record {i}")


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


def sampled_hash(path: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A file's size and 16 evenly spaced 64 KiB samples of its bytes, hashed: what tells a
    large file from another without reading it all."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with path.open("rb") as handle:
        for i in range(samples + 1):
            handle.seek(max(0, (size - chunk) * i // samples))
            digest.update(handle.read(chunk))
    return digest.hexdigest()
