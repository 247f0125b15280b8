"""Several sources in one split: each source's examples (its own store, tokenised once and
cached on its own), sampled to the share or count the source asks for and concatenated in
source order; batching shuffles them together as usual.

The sampling depends only on the seed and each source's number of examples, so every process
and every ``--resume`` draws the same mixture. A share above 1 (``path:2.0``) or a count above
the source's size repeats it: whole copies, then a sample of the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from .sources import DataSource
from .store import Examples


def contribution(source: DataSource, available: int) -> int:
    """How many examples a source gives the mixture."""
    if source.samples is not None:
        wanted = source.samples
    elif source.fraction is not None:
        wanted = round(source.fraction * available)
    else:
        wanted = available
    if wanted < 1:
        raise ConfigError(
            f"data: {source.label}:{source.fraction} contributes no examples "
            f"(it has {available}); give a larger share"
        )
    return wanted


def selection(available: int, wanted: int, seed: int, number: int) -> np.ndarray:
    """``wanted`` indices into ``available`` examples: whole copies, then a seeded sample of
    the rest in stored order (source ``number`` draws from its own stream)."""
    copies, rest = divmod(wanted, available)
    drawn = np.random.default_rng([seed, number]).permutation(available)[:rest]
    return np.concatenate([np.tile(np.arange(available), copies), np.sort(drawn)])


class MixtureExamples(Examples):
    """Examples drawn from several sources; each example's ``record`` names its source."""

    def __init__(
        self,
        parts: Sequence[Examples],
        labels: Sequence[str],
        source: np.ndarray,
        index: np.ndarray,
    ) -> None:
        self.parts, self.labels = list(parts), list(labels)
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    def example(self, index: int) -> dict[str, Any]:
        number = int(self.source[index])
        example = self.parts[number].example(int(self.index[index]))
        example["record"] = f"{self.labels[number]}, {example.get('record')}"
        example["index"] = index
        return example

    def _gathered(self, per_part: Any) -> np.ndarray:
        out = np.zeros(len(self.index), dtype=np.int64)
        for number, part in enumerate(self.parts):
            chosen = self.source == number
            out[chosen] = per_part(part)[self.index[chosen]]
        return out

    def lengths(self) -> np.ndarray:
        return self._gathered(lambda part: part.lengths())

    def prompt_lengths(self, prefix: str = "") -> np.ndarray:
        return self._gathered(lambda part: part.prompt_lengths(prefix))


def mix(
    parts: Sequence[Examples], sources: Sequence[DataSource], seed: int
) -> tuple[MixtureExamples, list[int]]:
    """The mixture of ``parts`` (one per source) and each source's contribution."""
    indices, numbers, contributed = [], [], []
    for number, (part, source) in enumerate(zip(parts, sources, strict=True)):
        wanted = contribution(source, len(part))
        indices.append(selection(len(part), wanted, seed, number))
        numbers.append(np.full(wanted, number, dtype=np.int32))
        contributed.append(wanted)
    labels = [source.label for source in sources]
    mixture = MixtureExamples(parts, labels, np.concatenate(numbers), np.concatenate(indices))
    return mixture, contributed
