"""Tokenised examples in memory-mapped files, read one example at a time.

A split's examples live in a directory of flat NumPy arrays, not in Python objects: for each
sequence of the examples (``input_ids``, ``chosen_input_ids``, …) the token ids of every
example end to end (``int32``), their completion mask (``uint8``) and each example's offset
(``int64``); the other values of each example (labels, scores, extra fields, ``record``) as one
compact JSON object each, end to end, with their offsets. The files are mapped, not read: pages
are shared by every process that maps them and the kernel can drop them, so a process's own
memory grows only by what it touches. ``examples[i]`` builds example ``i``'s dict on demand.

Why NumPy rather than Arrow: an example is a few array slices (a microsecond), and the per-
example lengths, offsets and masks that batching, ``--group-by-length`` and KTO's partners need
are arrays already, read without building a row. ``datasets`` (Arrow) stays the reader of hub
and saved datasets.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

STORE_VERSION = 1  # bump when the layout of the files changes
META = "meta.json"
SEQUENCE_SUFFIX = "input_ids"
MASK_SUFFIX = "completion_mask"


def example_length(example: dict[str, Any]) -> int:
    """The tokens of all of an example's sequences."""
    return sum(len(v) for k, v in example.items() if k.endswith(SEQUENCE_SUFFIX))


class Examples(Sequence):
    """A split's tokenised examples: ``len``, ``examples[i]`` (a new dict each time, holding its
    ``index``), iteration, and a slice as a list. What ``align_prepare_dataset`` receives and
    returns, and what the core batches from."""

    def __len__(self) -> int:
        raise NotImplementedError

    def example(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self.example(i) for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self.example(index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self.example(index)

    def lengths(self) -> np.ndarray:
        """The tokens of all sequences of each example (``int64``, one per example)."""
        return np.fromiter(map(example_length, self), dtype=np.int64, count=len(self))

    def value_column(self, name: str) -> Iterator[Any]:
        """One value of every example (``None`` where it has none), in order."""
        for example in self:
            yield example.get(name)

    def prompt_lengths(self, prefix: str = "") -> np.ndarray:
        """Each example's tokens before its first trained token in sequence ``prefix``."""
        key = f"{prefix}{MASK_SUFFIX}"
        return np.fromiter(
            (next((i for i, m in enumerate(e[key]) if m), len(e[key])) for e in self),
            dtype=np.int64,
            count=len(self),
        )

    def derive(
        self,
        add: Callable[[int, dict[str, Any]], dict[str, Any]],
        lengths: np.ndarray | None = None,
    ) -> Examples:
        """These examples with the values ``add(index, example)`` returns added to each, computed
        when an example is read: how a plugin's ``align_prepare_dataset`` adds a sequence or a
        value without holding every example (KTO's mismatched partners). ``lengths``: the tokens
        the added sequences hold, per example, if ``add`` adds any (for ``--group-by-length``)."""
        return DerivedExamples(self, add, lengths)


class ListExamples(Examples):
    """Examples held as a list of dicts: what a plugin's hook returns as a list, and small
    splits in tests."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.items = examples

    def __len__(self) -> int:
        return len(self.items)

    def example(self, index: int) -> dict[str, Any]:
        example = self.items[index]  # the list's own dict: a plugin may change it in place
        example["index"] = index
        return example


class DerivedExamples(Examples):
    """``base`` with values added to each example when it is read (see ``Examples.derive``)."""

    def __init__(
        self,
        base: Examples,
        add: Callable[[int, dict[str, Any]], dict[str, Any]],
        lengths: np.ndarray | None,
    ) -> None:
        self.base, self.add, self.added_lengths = base, add, lengths

    def __len__(self) -> int:
        return len(self.base)

    def example(self, index: int) -> dict[str, Any]:
        example = self.base.example(index)
        example.update(self.add(index, example))
        return example

    def lengths(self) -> np.ndarray:
        if self.added_lengths is None:
            return super().lengths()
        return self.base.lengths() + self.added_lengths

    def __getattr__(self, name: str) -> Any:  # sequence arrays and values of the stored base
        return getattr(self.base, name)


def _mapped(path: Path, dtype: Any) -> np.ndarray:
    """A flat array file, memory-mapped read-only (an empty one is an empty array: NumPy cannot
    map zero bytes)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class StoredExamples(Examples):
    """The examples of a store directory, memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = json.loads((self.path / META).read_text())
        if self.meta.get("version") != STORE_VERSION:
            raise ValueError(f"{self.path}: store version {self.meta.get('version')}")
        self.count = int(self.meta["examples"])
        self.sequences: dict[str, dict[str, Any]] = {}
        for number, prefix in enumerate(self.meta["sequences"]):
            base = self.path / f"seq{number}"
            arrays = {
                "ids": _mapped(base.with_suffix(".ids"), np.int32),
                "offsets": np.load(base.with_suffix(".offsets.npy"), mmap_mode="r"),
                "mask": None,
                "present": None,
            }
            if (mask := base.with_suffix(".mask")).exists():
                arrays["mask"] = _mapped(mask, np.uint8)
            if (present := base.with_suffix(".present.npy")).exists():
                arrays["present"] = np.load(present, mmap_mode="r")
            self._check(arrays, prefix)
            self.sequences[prefix] = arrays
        self.values = _mapped(self.path / "values.json", np.uint8)
        self.value_offsets = np.load(self.path / "values.offsets.npy", mmap_mode="r")
        if len(self.value_offsets) != self.count + 1 or self.value_offsets[-1] != len(self.values):
            raise ValueError(f"{self.path}: values.json does not match its offsets")

    def _check(self, arrays: dict[str, Any], prefix: str) -> None:
        """A store whose files do not add up (cut short, say) is refused, never half read."""
        offsets = arrays["offsets"]
        sizes = [len(arrays["ids"])] + ([len(arrays["mask"])] if arrays["mask"] is not None else [])
        if len(offsets) != self.count + 1 or any(int(offsets[-1]) != size for size in sizes):
            raise ValueError(f"{self.path}: the {prefix}input_ids files do not match their offsets")

    def __len__(self) -> int:
        return self.count

    def example(self, index: int) -> dict[str, Any]:
        example: dict[str, Any] = {}
        for prefix, arrays in self.sequences.items():
            present = arrays["present"]
            if present is not None and not present[index]:
                continue
            start, end = arrays["offsets"][index], arrays["offsets"][index + 1]
            example[prefix + SEQUENCE_SUFFIX] = arrays["ids"][start:end].tolist()
            if arrays["mask"] is not None:
                example[prefix + MASK_SUFFIX] = arrays["mask"][start:end].tolist()
        example.update(self._values(index))
        example["index"] = index
        return example

    def _values(self, index: int) -> dict[str, Any]:
        """Example ``index``'s values other than its sequences."""
        start, end = self.value_offsets[index], self.value_offsets[index + 1]
        return json.loads(self.values[start:end].tobytes())

    def sequence_lengths(self, prefix: str = "") -> np.ndarray:
        """Each example's tokens in sequence ``prefix`` (0 where an example has none)."""
        return np.diff(self.sequences[prefix]["offsets"])

    def lengths(self) -> np.ndarray:
        total = np.zeros(self.count, dtype=np.int64)
        for prefix in self.sequences:
            total += self.sequence_lengths(prefix)
        return total

    def prompt_lengths(self, prefix: str = "") -> np.ndarray:
        """Each example's tokens before its first trained token in sequence ``prefix`` (its
        length where none is trained), computed on the arrays."""
        arrays = self.sequences[prefix]
        offsets = np.asarray(arrays["offsets"], dtype=np.int64)
        result = np.diff(offsets)  # where nothing is trained: the whole length
        step = 1 << 14  # examples at a time, so the temporary arrays stay small
        for first in range(0, self.count, step):
            last = min(self.count, first + step)
            lo, hi = offsets[first], offsets[last]
            trained = np.flatnonzero(np.asarray(arrays["mask"][lo:hi])) + lo
            if not trained.size:
                continue
            owners = np.searchsorted(offsets, trained, side="right") - 1
            examples, where = np.unique(owners, return_index=True)  # each one's first trained
            result[examples] = trained[where] - offsets[examples]
        return result

    def value_column(self, name: str) -> Iterator[Any]:
        """One value of every example, in order, read from the store."""
        for index in range(self.count):
            yield self._values(index).get(name)


@dataclass
class _SequenceBlock:
    """One sequence (``prefix``) of a block of examples, encoded."""

    ids: bytes  # int32, end to end
    mask: bytes | None  # uint8, end to end; None: the sequence has no completion mask
    lengths: np.ndarray  # int64, one per example of the block (0 where absent)
    present: np.ndarray  # uint8, one per example of the block


@dataclass
class Block:
    """Examples encoded for the store, as a tokenising worker sends them back: a few byte
    strings instead of a dict of lists per example."""

    count: int
    sequences: dict[str, _SequenceBlock]  # in the order the examples name them
    values: bytes  # the examples' other values, one compact JSON object each, end to end
    value_lengths: np.ndarray  # int64, one per example


def encode_block(examples: Sequence[dict[str, Any]]) -> Block:
    """``examples`` as a :class:`Block` (a token id outside int32, or a sequence without its
    mask where others have one, is a ValueError)."""
    count = len(examples)
    parts: dict[str, dict[str, Any]] = {}
    values, value_lengths = [], np.zeros(count, dtype=np.int64)
    for row, example in enumerate(examples):
        other = {}
        for key, value in example.items():
            if key.endswith(SEQUENCE_SUFFIX):
                prefix = key[: -len(SEQUENCE_SUFFIX)]
                part = parts.setdefault(prefix, {"ids": [], "mask": [], "rows": []})
                part["ids"].append(value)
                part["mask"].append(example.get(prefix + MASK_SUFFIX))
                part["rows"].append(row)
            elif not key.endswith(MASK_SUFFIX) and key != "index":
                other[key] = value
        encoded = json.dumps(other, ensure_ascii=False, separators=(",", ":")).encode()
        values.append(encoded)
        value_lengths[row] = len(encoded)
    sequences = {}
    for prefix, part in parts.items():
        lengths = np.zeros(count, dtype=np.int64)
        present = np.zeros(count, dtype=np.uint8)
        sizes = [len(ids) for ids in part["ids"]]
        lengths[part["rows"]], present[part["rows"]] = sizes, 1
        flat = np.fromiter(chain.from_iterable(part["ids"]), dtype=np.int64, count=sum(sizes))
        if flat.size and (flat.min() < 0 or flat.max() >= 2**31):
            raise ValueError(f"{prefix}{SEQUENCE_SUFFIX}: a token id outside the int32 range")
        masks = part["mask"]
        if all(m is None for m in masks):
            mask = None
        elif any(m is None or len(m) != n for m, n in zip(masks, sizes, strict=True)):
            raise ValueError(f"{prefix}{SEQUENCE_SUFFIX}: a sequence without its completion mask")
        else:
            mask = np.fromiter(chain.from_iterable(masks), np.uint8, sum(sizes)).tobytes()
        sequences[prefix] = _SequenceBlock(flat.astype(np.int32).tobytes(), mask, lengths, present)
    return Block(count, sequences, b"".join(values), value_lengths)


class _SequenceFiles:
    """The files one sequence of the examples is written to."""

    def __init__(self, base: Path, first_example: int, has_mask: bool) -> None:
        self.base = base
        self.ids = open(base.with_suffix(".ids"), "wb")  # noqa: SIM115 (closed in close())
        self.mask = open(base.with_suffix(".mask"), "wb") if has_mask else None  # noqa: SIM115
        self.lengths = array("q", bytes(8 * first_example))
        self.present = bytearray(first_example)
        self.all_present = first_example == 0

    def add(self, block: _SequenceBlock) -> None:
        if (block.mask is None) != (self.mask is None):
            raise ValueError(f"{self.base.name}: a sequence without its completion mask")
        self.ids.write(block.ids)
        if self.mask is not None:
            self.mask.write(block.mask)
        self.lengths.frombytes(block.lengths.tobytes())
        self.present += block.present.tobytes()
        self.all_present = self.all_present and bool(block.present.all())

    def skip(self, count: int) -> None:
        self.lengths.frombytes(bytes(8 * count))
        self.present += bytes(count)
        self.all_present = False

    def close(self) -> None:
        self.ids.close()
        if self.mask is not None:
            self.mask.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.lengths, dtype=np.int64), out=offsets[1:])
        np.save(self.base.with_suffix(".offsets.npy"), offsets)
        if not self.all_present:
            np.save(self.base.with_suffix(".present.npy"), np.frombuffer(self.present, np.uint8))


class StoreWriter:
    """Appends examples to a new store directory; ``close`` writes the offsets and meta.json
    last, so a store without meta.json is never complete."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.sequences: dict[str, _SequenceFiles] = {}
        self.values = open(self.path / "values.json", "wb")  # noqa: SIM115 (closed in close())
        self.value_lengths = array("q")
        self.count = 0

    def add(self, example: dict[str, Any]) -> None:
        self.add_block(encode_block([example]))

    def add_block(self, block: Block) -> None:
        for prefix, part in block.sequences.items():
            files = self.sequences.get(prefix)
            if files is None:
                base = self.path / f"seq{len(self.sequences)}"
                files = _SequenceFiles(base, self.count, part.mask is not None)
                self.sequences[prefix] = files
            files.add(part)
        for prefix, files in self.sequences.items():
            if prefix not in block.sequences:
                files.skip(block.count)
        self.values.write(block.values)
        self.value_lengths.frombytes(block.value_lengths.tobytes())
        self.count += block.count

    def close(self, meta: dict[str, Any]) -> None:
        for files in self.sequences.values():
            files.close()
        self.values.close()
        offsets = np.zeros(self.count + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.value_lengths, dtype=np.int64), out=offsets[1:])
        np.save(self.path / "values.offsets.npy", offsets)
        meta = {
            **meta,
            "version": STORE_VERSION,
            "examples": self.count,
            "sequences": list(self.sequences),
        }
        tmp = self.path / f".{META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.path / META)

    def abort(self) -> None:
        for files in self.sequences.values():
            files.ids.close()
            if files.mask is not None:
                files.mask.close()
        self.values.close()
