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
from .memory import InMemoryData
from .records import (
    Record,
    count_records,
    fingerprint,
    iter_records,
    jsonl_chunks,
    rename_columns,
    sampled_hash,
)

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
    fraction: float | None = None  # in a mixture: this share of the source's examples
    samples: int | None = None  # in a mixture: this many of the source's examples
    format: str | None = None  # in a mixture: this source's data format (else --format's)
    # Records given in memory (align.train): ``name`` is then their label, not a path.
    in_memory: InMemoryData | None = field(default=None, compare=False, repr=False)

    @property
    def from_hub(self) -> bool:
        if self.in_memory is not None:
            return False
        return is_hub_id(self.name) or is_dataset_repository(Path(self.name))

    @property
    def label(self) -> str:
        """How messages name the data: the path, ``org/name`` with its split, or records in
        memory as Python names them (``data``)."""
        if self.in_memory is not None:
            return self.in_memory.label
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
        dataset's fingerprint, which ``datasets`` derives from its files' hashes and revision;
        records in memory: see :mod:`align.data.memory`."""
        if self.in_memory is not None:
            return self.in_memory.fingerprint()
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
        if self.in_memory is not None:
            return len(self.in_memory)
        return len(self.load()) if self.from_hub else count_records(self.name)

    def records(self) -> Iterator[Record]:
        """The records, renamed through the column mapping."""
        if self.in_memory is not None:
            found = self.in_memory.records()
        else:
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

        jsonl = Path(self.name).suffix.lower() == ".jsonl"
        if self.in_memory is None and not self.from_hub and jsonl:
            if not Path(self.name).exists():
                raise DataError("no such file or directory", source=self.name)
            return jsonl_chunks(self.name, CHUNK, self.columns)
        return record_chunks(self.records())

    def stream_records(self) -> Iterator[Record]:
        """The records read as they are consumed, for ``--streaming``: a local file through
        align's readers, a hub dataset as a ``datasets`` IterableDataset (nothing downloaded
        ahead); records in memory as they are."""
        if self.in_memory is not None:
            found = self.in_memory.records()
        elif self.from_hub:
            import datasets

            try:
                stream = datasets.load_dataset(
                    self.name, self.subset, split=self.split, revision=self.revision,
                    streaming=True,
                )  # fmt: skip
            except Exception as exc:
                raise DataError(
                    f"cannot stream the dataset: {_one_line(exc)}", source=self.label
                ) from None
            found = (
                Record(row, self.label, f"record {n}") for n, row in enumerate(stream, start=1)
            )
        else:
            found = iter_records(self.name)
        for record in found:
            yield rename_columns(record, self.columns) if self.columns else record

    def column_names(self, streaming: bool = False) -> list[str] | None:
        """The columns that tell the data's format: those its first record holds a value for
        (not null: Parquet files and hub datasets give a record every column of the file, null
        where it has none), as the column mapping renames them. None when there is no record to
        tell by (reading the data then says why)."""
        try:
            found = self.stream_records() if streaming else self.records()
            first = next(iter(found), None)
        except DataError:
            return None
        return None if first is None else [k for k, v in first.data.items() if v is not None]

    def stream_fingerprint(self) -> str:
        """What identifies streamed data without reading it all: a local file's size and a
        hash of samples of its bytes; a hub dataset's name, subset, split and revision; records
        in memory, their fingerprint."""
        if self.in_memory is not None:
            return "stream:" + self.in_memory.fingerprint()
        if is_hub_id(self.name):
            return f"stream:{self.name}:{self.subset}:{self.split}:{self.revision}"
        path = Path(self.name)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return "stream:" + ":".join(sampled_hash(file) for file in files)

    def _hub_records(self) -> Iterator[Record]:
        loaded = self.load()
        if len(loaded) == 0:
            raise DataError("contains no records", source=self.label)
        for number, row in enumerate(loaded, start=1):
            yield Record(row, self.label, f"record {number}")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- mixtures ----------------------------------------------------------------------------------
_WEIGHT = re.compile(r"^(?P<name>.+):(?P<weight>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)$")
SOURCE_KEYS = ("path", "weight", "samples", "split", "subset", "revision", "columns", "format")


def parse_sources(
    value: Any,
    split: str,
    subset: str | None,
    revision: str | None,
    columns: dict[str, str],
    in_memory: dict[str, InMemoryData] | None = None,
) -> list[DataSource]:
    """A split's data as the options give it: one source (a path or hub id), or a mixture, a
    list whose items are ``path``, ``path:0.3`` (that share of its examples), ``path:5000``
    (that many) or, in YAML, a mapping with ``path`` and ``weight`` or ``samples``, and the
    source's own ``split``, ``subset``, ``revision``, ``columns`` or ``format``. A name that
    ``in_memory`` holds is records given in memory (``align.train``), under that label."""
    from ..errors import ConfigError

    items = value if isinstance(value, list) else [value]
    sources = []
    for item in items:
        if isinstance(item, str) and item in (in_memory or {}):
            sources.append(DataSource(item, columns=dict(columns), in_memory=in_memory[item]))
            continue
        if isinstance(item, str):
            sources.append(_from_text(item, split, subset, revision, columns))
            continue
        if not isinstance(item, dict) or "path" not in item:
            raise ConfigError(f"data: expected a path or a mapping with `path`, got {item!r}")
        unknown = sorted(set(item) - set(SOURCE_KEYS))
        if unknown:
            from ..suggest import did_you_mean

            raise ConfigError(
                f"data: unknown key {unknown[0]!r} for source {item['path']!r}."
                + did_you_mean(unknown[0], SOURCE_KEYS)
            )
        if "weight" in item and "samples" in item:
            raise ConfigError(f"data: source {item['path']!r} has both weight and samples")
        weight, samples = item.get("weight"), item.get("samples")
        if weight is not None and not (_is_number(weight) and 0 < weight < float("inf")):
            raise ConfigError(f"data: source {item['path']!r}: weight must be a number > 0")
        if samples is not None and not (_is_number(samples) and isinstance(samples, int)):
            raise ConfigError(f"data: source {item['path']!r}: samples must be an integer ≥ 1")
        if samples is not None and samples < 1:
            raise ConfigError(f"data: source {item['path']!r}: samples must be an integer ≥ 1")
        sources.append(
            DataSource(
                str(item["path"]),
                item.get("split", split),
                item.get("subset", subset),
                item.get("revision", revision),
                dict(item.get("columns") or columns),
                None if weight is None else float(weight),
                samples,
                item.get("format"),
            )
        )
    return sources


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _from_text(
    text: str, split: str, subset: str | None, revision: str | None, columns: dict[str, str]
) -> DataSource:
    """``path``, ``path:0.3`` or ``path:5000`` (a path that exists as given is a path)."""
    match = _WEIGHT.match(text)
    if match is None or Path(text).exists():
        return DataSource(text, split, subset, revision, dict(columns))
    name, weight = match.group("name"), match.group("weight")
    if weight.isdigit():
        return DataSource(name, split, subset, revision, dict(columns), samples=int(weight))
    return DataSource(name, split, subset, revision, dict(columns), fraction=float(weight))


def is_mixture(sources: list[DataSource]) -> bool:
    return len(sources) > 1 or any(s.fraction is not None or s.samples for s in sources)


def mixture_fingerprint(sources: list[DataSource], fingerprints: list[str]) -> str:
    """One fingerprint for a split: its source's, or for a mixture a hash of every source's
    fingerprint and share."""
    if not is_mixture(sources):
        return fingerprints[0]
    import hashlib
    import json

    parts = [[f, s.fraction, s.samples] for s, f in zip(sources, fingerprints, strict=True)]
    return "mixture:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()
