"""``--streaming``: train on data larger than memory or disk, tokenised as training reads it.

Each process reads the source's records in order and keeps every P-th (process p the records
``p, p + P, …``), shuffles them through a buffer of ``shuffle_buffer`` records (seeded by the
seed, the epoch and the process), tokenises them in background worker processes a few chunks
ahead of training, and cuts the examples into micro-batches. At the end of the stream the next
epoch starts with another shuffle, so the stream never runs dry and every process takes the same
number of micro-batches (the run's length is ``--max-steps``).

The position is three numbers per process: the epoch, the shuffled records whose examples were
all trained on, and the examples already taken from the next one. A checkpoint stores them; a
resumed run reads the stream again up to that position (reading and shuffling, not tokenising)
and goes on with the very batches the interrupted run would have trained on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from .examples import DataReport, RecordTokenizer
from .records import Record
from .sources import DataSource
from .store import Examples, ListExamples

CHUNK = 64  # records a worker tokenises at a time


@dataclass(frozen=True)
class StreamPosition:
    """Where a process's stream is: the epoch, the shuffled records all of whose examples were
    trained on, the examples already taken from the next record, and the examples taken in
    all (which numbers them)."""

    epoch: int = 0
    records: int = 0
    examples: int = 0
    taken: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def shuffled(records: Iterator[Record], size: int, rng: np.random.Generator) -> Iterator[Record]:
    """A shuffle buffer of ``size`` records: once it is full each new record takes the place of
    a randomly drawn one, which is emitted; at the end the rest leave in a random order."""
    buffer: list[Record] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = record
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


class RecentExamples(Examples):
    """The examples a streaming run took most recently, by their running number: what the core
    reads back for a micro-batch's counts or to name the examples of a non-finite loss. A
    slice gives the first examples of the stream (to probe the data's layout)."""

    def __init__(self, head: Callable[[int], list[dict[str, Any]]], keep: int) -> None:
        self.head, self.keep = head, keep
        self.kept: dict[int, dict[str, Any]] = {}
        self.order: deque[int] = deque()

    def __len__(self) -> int:
        return max(self.kept, default=-1) + 1

    def add(self, number: int, example: dict[str, Any]) -> None:
        self.kept[number] = example
        self.order.append(number)
        while len(self.order) > self.keep:
            self.kept.pop(self.order.popleft(), None)

    def example(self, index: int) -> dict[str, Any]:
        return self.kept[index]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return ListExamples(self.head(index.stop or 1))[index]
        return self.kept[int(index)]


class StreamingBatches:
    """This process's micro-batches from a stream, collated and on device."""

    def __init__(
        self,
        source: DataSource,
        tokenise: RecordTokenizer,
        batch_size: int,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        accelerator: Any,
        seed: int,
        buffer: int,
        workers: int,
    ) -> None:
        self.source, self.tokenise, self.batch_size = source, tokenise, batch_size
        self.collate, self.accelerator, self.seed = collate, accelerator, seed
        self.buffer, self.workers = buffer, workers
        self.position = StreamPosition()
        self.report = DataReport(split="train")
        self.examples = RecentExamples(self.first_examples, keep=64 * batch_size)

    # -- the records ---------------------------------------------------------------------------
    def _records(self, epoch: int) -> Iterator[Record]:
        """This process's records of one epoch, shuffled."""
        count, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = (r for n, r in enumerate(self.source.stream_records()) if n % count == rank)
        return shuffled(mine, self.buffer, np.random.default_rng([self.seed, epoch, rank]))

    def first_examples(self, count: int) -> list[dict[str, Any]]:
        """The first examples of the stream as read (no shuffle): a sample of its layout."""
        report, found = DataReport(split="train"), []
        for record in self.source.stream_records():
            found += self.tokenise.examples(record, report)
            if len(found) >= count or report.records >= 10 * count:
                break
        if not found:
            raise DataError("the stream has no usable examples", source=self.source.label)
        return found[:count]

    def _tokenised(self, records: Iterator[Record]) -> Iterator[list[dict[str, Any]]]:
        """Each record's examples, in order, tokenised by the worker processes a few chunks
        ahead (in this process with one worker); closing it stops the workers."""
        from .build import in_order, tokenise_each

        chunks = _chunks(records)
        for examples, report in in_order(
            tokenise_each, chunks, self.tokenise, self.workers, ahead=2 * self.workers
        ):
            self.report.add(report)
            yield from examples

    def _examples(self, start: StreamPosition) -> Iterator[tuple[dict[str, Any], StreamPosition]]:
        """Every example from ``start`` on, each with the position after it."""
        epoch, skip_records, skip_examples, taken = (
            start.epoch,
            start.records,
            start.examples,
            start.taken,
        )
        while True:
            records = self._records(epoch)
            for _ in range(skip_records):  # read and shuffled again, not tokenised
                if next(records, None) is None:
                    break
            produced = False
            for number, examples in enumerate(self._tokenised(records), start=skip_records):
                for index in range(skip_examples, len(examples)):
                    produced = True
                    taken += 1
                    last = index + 1 == len(examples)
                    after = StreamPosition(epoch, number + last, 0 if last else index + 1, taken)
                    yield examples[index], after
                skip_examples = 0
            if not produced and skip_records == 0:
                raise DataError(
                    f"the stream gives process {self.accelerator.process_index} of "
                    f"{self.accelerator.num_processes} no usable examples",
                    source=self.source.label,
                )
            epoch, skip_records = epoch + 1, 0

    def groups(self, grad_accum: int, start: StreamPosition) -> Iterator[list]:
        """Endless groups of ``grad_accum`` ``(indices, micro-batch)`` pairs from ``start`` on;
        ``position`` is the stream's position after the last group taken."""
        from accelerate.utils import send_to_device

        self.position = start
        examples = self._examples(start)
        while True:
            group = []
            for _ in range(grad_accum):
                batch, indices = [], []
                for _ in range(self.batch_size):
                    example, self.position = next(examples)
                    number = self.position.taken - 1
                    example["index"] = number
                    self.examples.add(number, example)
                    batch.append(example)
                    indices.append(number)
                collated = self.collate(batch)
                group.append((indices, send_to_device(collated, self.accelerator.device)))
            yield group


def _chunks(records: Iterator[Record]) -> Iterator[list[Record]]:
    from itertools import islice

    while chunk := list(islice(records, CHUNK)):
        yield chunk
