"""Metrics as sums and counts, reduced over micro-batches and processes as Σsum / Σcount.

A mean of per-process (or per-micro-batch) means is wrong for token means and for uneven class
counts, so plugins return ``(sum, count)`` pairs and only the final division happens here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch


class MetricSums:
    """Running ``name -> [sum, count]`` totals since the last report.

    Totals stay on the device their values came from until :meth:`totals`, so adding a GPU
    metric never waits for the GPU.
    """

    def __init__(self) -> None:
        self._totals: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, value: Any, count: Any) -> None:
        value = torch.as_tensor(value).detach().to(torch.float64).sum()
        count = torch.as_tensor(count).detach().to(torch.float64).sum()
        if name in self._totals:
            self._totals[name][0] += value
            self._totals[name][1] += count
        else:
            self._totals[name] = [value, count]

    def add_output(self, output: Any, extra: Mapping[str, tuple[Any, Any]]) -> None:
        """A loss hook's loss and metrics, and the metrics other plugins added for its batch."""
        self.add("loss", output.loss, output.count)
        self.add_all(output.metrics)
        self.add_all(extra)

    def add_all(self, metrics: Mapping[str, tuple[Any, Any]], prefix: str = "") -> None:
        for name, pair in metrics.items():
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"metric {name!r} must be a (sum, count) pair, got {pair!r}")
            self.add(prefix + name, *pair)

    def reduce(self, accelerator: Any = None) -> dict[str, float]:
        """Σsum/Σcount over every process; a metric whose total count is 0 is left out."""
        return means(self.totals(accelerator))

    def totals(self, accelerator: Any = None) -> dict[str, tuple[float, float]]:
        """``name -> (Σsum, Σcount)`` over every process (every process must call this)."""
        names = sorted(self._totals)
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            names = sorted({n for group in gather_object([names]) for n in group})
        if not names:
            return {}
        zero = torch.zeros((), dtype=torch.float64)
        stacked = torch.stack(
            [torch.stack([t.cpu() for t in self._totals.get(n, [zero, zero])]) for n in names]
        )
        if accelerator is not None and accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="sum").cpu()
        return {n: (s, c) for n, (s, c) in zip(names, stacked.tolist(), strict=True)}

    def add_totals(self, totals: Mapping[str, tuple[Any, Any]]) -> None:
        """Add ``name -> (sum, count)`` totals: another's ``totals()`` (a step's, once it is
        known to be good), or those a checkpoint saved."""
        for name, (value, count) in totals.items():
            self.add(name, value, count)

    def clear(self) -> None:
        self._totals.clear()


def means(totals: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """``Σsum / Σcount`` per metric, leaving out those with no count (no NaN)."""
    return {name: s / c for name, (s, c) in totals.items() if c > 0}


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step, main process) and Accelerate trackers."""

    def __init__(self, path: Any, accelerator: Any) -> None:
        self.accelerator = accelerator
        self._file = None
        if accelerator.is_main_process:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, values: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(values) + "\n")
            self._file.flush()
        self.accelerator.log({k: v for k, v in values.items() if k != "step"}, step=values["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
