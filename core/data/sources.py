"""Where a split's records come from: a local file, a saved dataset, or a dataset on the hub
(``org/name``, or a dataset repository on disk) loaded with ``datasets.load_dataset``; with an
optional column mapping for data whose columns have other names (``question`` → ``prompt``),
as LLaMA-Factory's ``dataset_info`` and axolotl's ``field_*`` options do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .records import Record, count_records, fingerprint, iter_records, jsonl_chunks

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")  # what save_to_disk writes


def is_hub_id(name: str) -> bool:
    """``org/name`` that is no local path: a dataset on the hub."""
    return not Path(name).exists() and HUB_ID.fullmatch(name) is not None


def is_dataset_repository(path: Path) -> bool:
    """A directory laid out as a hub dataset repository (data files, maybe a README with its
    configs), not a directory written by ``save_to_disk``."""
    return path.is_dir() and not any((path / name).exists() for name in SAVED_DATASET_FILES)


@dataclass(frozen=True)
class DataSource:
    """One split's data as the options give it."""

    name: str  # a path or a hub id
    split: str = "train"  # of a hub dataset
    subset: str | None = None  # a hub dataset's config
    revision: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # source column → format column

    @property
    def from_hub(self) -> bool:
        return is_hub_id(self.name) or is_dataset_repository(Path(self.name))

    @property
    def label(self) -> str:
        """How messages name the data: the path, or ``org/name`` with its split."""
        if not self.from_hub:
            return self.name
        details = [f"split {self.split}"]
        if self.subset:
            details.insert(0, f"subset {self.subset}")
        if self.revision:
            details.append(f"revision {self.revision}")
        return f"{self.name} ({', '.join(details)})"

    def fingerprint(self) -> str:
        """The data's identity: a local file's or repository's bytes (sha256), or the hub
        dataset's fingerprint, which ``datasets`` derives from its files' hashes and revision."""
        if not is_hub_id(self.name):
            digest = fingerprint(self.name)
            if self.from_hub:  # one repository holds several subsets and splits
                return f"{digest}:{self.subset}:{self.split}"
            return digest
        return f"hub:{self.load()._fingerprint}:{self.revision}"

    def load(self) -> Any:
        """The hub dataset's split, memory-mapped from the ``datasets`` cache."""
        import datasets

        try:
            loaded = datasets.load_dataset(
                self.name, self.subset, split=self.split, revision=self.revision
            )
        except Exception as exc:  # offline, not found, no such split or subset: datasets' errors
            raise DataError(
                f"cannot load the dataset: {_one_line(exc)}", source=self.label
            ) from None
        return loaded

    def count(self) -> int | None:
        return len(self.load()) if self.from_hub else count_records(self.name)

    def records(self) -> Iterator[Record]:
        """The records, renamed through the column mapping."""
        found = self._hub_records() if self.from_hub else iter_records(self.name)
        if not self.columns:
            yield from found
            return
        for record in found:
            yield rename_columns(record, self.columns)

    def chunks(self) -> Iterator[Any]:
        """The records in chunks for the tokenising workers: a JSON Lines file as unparsed
        lines (the workers parse them), any other source as records."""
        from .build import CHUNK, record_chunks

        if not self.from_hub and Path(self.name).suffix.lower() == ".jsonl":
            if not Path(self.name).exists():
                raise DataError("no such file or directory", source=self.name)
            return jsonl_chunks(self.name, CHUNK, self.columns)
        return record_chunks(self.records())

    def _hub_records(self) -> Iterator[Record]:
        loaded = self.load()
        if len(loaded) == 0:
            raise DataError("contains no records", source=self.label)
        for number, row in enumerate(loaded, start=1):
            yield Record(row, self.label, f"record {number}")


def rename_columns(record: Record, columns: dict[str, str]) -> Record:
    """The record with its columns renamed (``question`` → ``prompt``); errors about a renamed
    field name it as the file does."""
    data = {columns.get(key, key): value for key, value in record.data.items()}
    renamed = tuple((new, old) for old, new in columns.items() if old in record.data)
    return Record(data, record.source, record.location, record.from_text, renamed)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
