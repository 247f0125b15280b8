"""Records handed over in memory (``align.train(data=[{...}, ...])`` or a ``datasets.Dataset``):
read by the same :class:`~align.data.sources.DataSource` as files and hub datasets, so they go
through the same format detection, strict validation and tokenisation, and each record is named
as Python indexes it (``data[3]``).

The data cache keys a split by its content: a list of records by a sha256 of its records as
canonical JSON (numpy and torch values by their ``tolist()``), a ``datasets.Dataset`` by the
fingerprint ``datasets`` keeps for it (derived from its table, or from the files and the
transforms that made it; a transform ``datasets`` cannot hash gets a random fingerprint, which
costs a new store, never a wrong one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .records import Record


def is_dataset(value: Any) -> bool:
    """A ``datasets.Dataset`` (checked without importing ``datasets``)."""
    return any(
        cls.__module__.startswith("datasets.") and cls.__name__ == "Dataset"
        for cls in type(value).__mro__
    )


def is_record_list(value: Any) -> bool:
    """A list (or tuple) of records given in memory: one whose items are all mappings."""
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(item, Mapping) for item in value)
    )


@dataclass(frozen=True, eq=False)
class InMemoryData:
    """A split's records held in memory: a list of dicts, or a ``datasets.Dataset``.

    ``label`` is how messages and run.json name it (``data``, ``eval_data``, ``data[1]`` in a
    mixture); a record is ``label[i]``, its index in the list or dataset."""

    label: str
    rows: Any  # list[dict] | datasets.Dataset

    @property
    def description(self) -> str:
        if is_dataset(self.rows):
            return f"a datasets.Dataset of {len(self.rows)} rows"
        return f"a list of {len(self.rows)} records"

    def __len__(self) -> int:
        return len(self.rows)

    def records(self) -> Iterator[Record]:
        if len(self.rows) == 0:
            raise DataError("contains no records", source=self.label)
        for index, row in enumerate(self.rows):
            if not isinstance(row, Mapping):
                raise DataError(
                    f"expected a record (a dict of columns), got {type(row).__name__}",
                    source=self.label,
                    location=f"[{index}]",
                )
            yield Record(dict(row), self.label, f"[{index}]")

    def fingerprint(self) -> str:
        """The records' identity for the data cache (see the module's docstring)."""
        if is_dataset(self.rows):
            return f"memory:dataset:{self.rows._fingerprint}:{len(self.rows)}"
        digest = hashlib.sha256()
        for row in self.rows:
            text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=_plain)
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\n")
        return f"memory:records:{digest.hexdigest()}"


def _plain(value: Any) -> Any:
    """A value JSON cannot write, as canonical JSON sees it: a numpy or torch value by its
    ``tolist()``; anything else by its type and repr (a column no format reads: the tokenised
    examples do not depend on it, and a column a format reads must hold JSON types)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return f"<{type(value).__module__}.{type(value).__qualname__}> {value!r}"
