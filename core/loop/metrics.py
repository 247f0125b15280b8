"""Metrics as sums and counts, reduced over micro-batches and processes as Σsum / Σcount.

A mean of per-process (or per-micro-batch) means is wrong for token means and for uneven class
counts, so plugins return ``(sum, count)`` pairs and only the final division happens here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch


def _float64(value: Any) -> torch.Tensor:
    """A tensor's values, or a Python number's, in float64 (a float is not rounded to float32
    on the way: β = 0.1 is logged as 0.1)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.as_tensor(value, dtype=torch.float64)


class MetricSums:
    """Running ``name -> [sum, count]`` totals since the last report.

    Totals stay on the device their values came from until :meth:`totals`, so adding a GPU
    metric never waits for the GPU.
    """

    def __init__(self) -> None:
        self._totals: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, value: Any, count: Any) -> None:
        value = _float64(value).sum()
        count = _float64(count).sum()
        if name in self._totals:
            self._totals[name][0] += value
            self._totals[name][1] += count
        else:
            self._totals[name] = [value, count]

    def add_output(self, output: Any, extra: Mapping[str, tuple[Any, Any]]) -> None:
        """A loss hook's loss and metrics, and the metrics other plugins added for its batch.

        A loss of several terms is kept as ``loss/<term>``; :func:`with_total_loss` adds their
        means up to ``loss`` once they are reduced."""
        if output.terms:
            for name, (value, count) in output.terms.items():
                self.add(f"{TERM_PREFIX}{name}", value, count)
        else:
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


TERM_PREFIX = "loss/"  # a multi-term loss's terms, as metrics


def with_total_loss(values: dict[str, float]) -> dict[str, float]:
    """``loss`` of a multi-term loss: the sum of its terms' means (each ``Σsum / Σcount``)."""
    terms = [v for k, v in values.items() if k.startswith(TERM_PREFIX)]
    if "loss" in values or not terms:
        return values
    return {"loss": sum(terms), **values}


def means(totals: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """``Σsum / Σcount`` per metric, leaving out those with no count (no NaN)."""
    return {name: s / c for name, (s, c) in totals.items() if c > 0}


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step, main process) and Accelerate trackers.

    ``last`` keeps the latest training row (``"train"``) and evaluation row (``"eval"``) for the
    summary a run prints when it ends.
    """

    def __init__(self, path: Any, accelerator: Any) -> None:
        self.accelerator = accelerator
        self._file = None
        self.last: dict[str, dict[str, Any]] = {}
        if accelerator.is_main_process:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, values: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(values) + "\n")
            self._file.flush()
        self.last["eval" if "eval_loss" in values else "train"] = values
        self.accelerator.log({k: v for k, v in values.items() if k != "step"}, step=values["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# Printed after the eval loss, in this order, when an objective logs them: DPO's reward accuracy
# and margin (KTO's margin), SFT's token accuracy, MinorSFT's and IFT's NLL, and the deviation
# from the reference (MinorSFT, --eval-deviation). An objective that logs none of these has its
# first few metrics printed instead.
HEADLINE_METRICS = (
    "reward",  # on-policy objectives: the mean reward of the samples, then each function's
    "rewards/accuracies",
    "rewards/margins",
    "mean_token_accuracy",
    "nll",
    "deviation",
)
OTHER_METRICS_SHOWN = 3


def format_value(value: float) -> str:
    """Four significant digits: ``0.6931``, ``1.234e-06`` (a DPO loss near 0 is not ``0.0000``)."""
    return f"{value:.4g}"


def headline(values: Mapping[str, Any], prefix: str = "") -> str:
    """``loss 0.6421, rewards/accuracies 0.75``: a row's loss and headline metrics.

    ``prefix`` is the row's metric prefix (``eval_``), left out of the names printed.
    """
    found = {
        name[len(prefix) :]: value
        for name, value in values.items()
        if name.startswith(prefix) and isinstance(value, int | float)
    }
    names = [name for name in HEADLINE_METRICS if name in found]
    names += sorted(n for n in found if n.startswith("rewards/") and n.endswith("/mean"))
    if not names:
        names = sorted(found.keys() - {"loss"})[:OTHER_METRICS_SHOWN]
    return ", ".join(f"{n} {format_value(found[n])}" for n in ["loss", *names] if n in found)
