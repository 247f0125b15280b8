"""Splitting examples into per-process micro-batches without dropping or repeating any.

Accelerate's prepared data loaders pad the last batch of every process by repeating examples,
which skews evaluation metrics and epoch counts. Here each epoch's order is cut into global
batches of ``batch_size × num_processes`` examples, and each global batch into contiguous,
near-equal parts, one per process. A final global batch too small to give every process an
example (fewer than ``num_processes`` examples) joins the one before it, so a micro-batch can
then hold up to ``batch_size + 1`` examples. Every process gets the same number of
micro-batches, so collectives inside loss hooks stay in step. One process with batch ``P·b``
sees exactly the union of what ``P`` processes with batch ``b`` see, except when that merge
happens (the epoch's size modulo ``P·b`` is between 1 and ``P − 1``).

``group_by_length`` (as in Hugging Face's Trainer) sorts each run of 50 global batches of the
shuffled order by length, so examples of similar length share a micro-batch and pad (or pack)
less; the batches' order is shuffled again, with the longest first so a batch too large for
memory fails at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .store import Examples, ListExamples


def shard_batches(
    order: Sequence[int], batch_size: int, num_processes: int, process_index: int
) -> list[list[int]]:
    """This process's micro-batches (lists of example indices) for one epoch in ``order``."""
    global_size = batch_size * num_processes
    bounds = list(range(0, len(order), global_size))
    if len(bounds) > 1 and len(order) - bounds[-1] < num_processes:
        bounds.pop()  # the tail joins the previous global batch
    batches = []
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else len(order)
        chunk = order[start:end]  # a view of an array, a copy of a list
        base, extra = divmod(len(chunk), num_processes)
        lo = process_index * base + min(process_index, extra)
        batches.append(chunk[lo : lo + base + (process_index < extra)])
    return batches


class ShardedBatches:
    """Per-process micro-batches over the examples of one split, collated and on device."""

    def __init__(
        self,
        examples: Examples | list[dict[str, Any]],
        batch_size: int,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        accelerator: Any,
        shuffle: bool,
        seed: int,
        split: str,
        group_by_length: bool = False,
    ) -> None:
        if len(examples) < accelerator.num_processes:
            raise DataError(
                f"the {split} split has {len(examples)} examples, fewer than the "
                f"{accelerator.num_processes} processes"
            )
        if isinstance(examples, list):
            examples = ListExamples(examples)
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.accelerator, self.shuffle, self.seed = accelerator, shuffle, seed
        self.lengths = examples.lengths() if group_by_length and shuffle else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.examples), generator=generator).numpy()
        if self.lengths is not None:
            order = self._grouped_by_length(order, generator)
        return order

    def _grouped_by_length(self, order: np.ndarray, generator: torch.Generator) -> np.ndarray:
        size, lengths = self.batch_size * self.accelerator.num_processes, self.lengths
        mega = 50 * size
        parts = [order[start : start + mega] for start in range(0, len(order), mega)]
        grouped = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts])
        batches = [grouped[i : i + size] for i in range(0, len(grouped), size)]
        short = len(batches) > 1 and len(batches[-1]) < size
        tail = [batches.pop()] if short else []  # the short batch stays last
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        longest = max(range(len(shuffled)), key=lambda b: lengths[shuffled[b]].max())
        shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        return np.concatenate(shuffled + tail)

    def _batches(self) -> list[Any]:
        return shard_batches(
            self._order(),
            self.batch_size,
            self.accelerator.num_processes,
            self.accelerator.process_index,
        )

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _indices, batch in self.batches():
            yield batch

    def batches(self, start: int = 0) -> Iterator[tuple[list[int], dict[str, Any]]]:
        """``(example indices, batch)`` of this epoch's micro-batches from number ``start`` on
        (a resumed run skips what it trained on without building those batches)."""
        from accelerate.utils import send_to_device

        for indices in self._batches()[start:]:
            indices = [int(i) for i in indices]
            batch = self.collate([self.examples[i] for i in indices])
            yield indices, send_to_device(batch, self.accelerator.device)
