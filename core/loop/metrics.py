"""Metrics as sums and counts, reduced over micro-batches and processes as Σsum / Σcount.

A mean of per-process (or per-micro-batch) means is wrong for token means and for uneven class
counts, so plugins return ``(sum, count)`` pairs and only the final division happens here. A
minimum or maximum (``align.Extreme``, TRL's ``clip_ratio/low_min``) is kept per micro-batch
until the report, where each micro-batch's extreme is taken over every process and their mean
becomes a ``(sum, count)`` pair like the others.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from ..plugins.api import Extreme


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
        # name -> (kind, one local extreme per micro-batch; NaN where it had no values)
        self._extremes: dict[str, tuple[str, list[torch.Tensor]]] = {}

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

    def add_extreme(self, name: str, extreme: Extreme) -> None:
        """One micro-batch's minimum or maximum of ``extreme.values`` (NaN left out; NaN when
        all are), on the values' device and without waiting for it."""
        values = _float64(extreme.values).flatten()
        if not values.numel():
            local = values.new_tensor(float("nan"))
        else:
            missing = values.isnan()
            if extreme.kind == "min":
                local = values.masked_fill(missing, float("inf")).amin()
            else:
                local = values.masked_fill(missing, float("-inf")).amax()
            local = torch.where(missing.all(), float("nan"), local)
        kind, extremes = self._extremes.setdefault(name, (extreme.kind, []))
        if kind != extreme.kind:
            raise TypeError(f"metric {name!r} was a {kind}imum and is now a {extreme.kind}imum")
        extremes.append(local)

    def add_all(self, metrics: Mapping[str, Any], prefix: str = "") -> None:
        for name, pair in metrics.items():
            if isinstance(pair, Extreme):
                self.add_extreme(prefix + name, pair)
                continue
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(
                    f"metric {name!r} must be a (sum, count) pair or an align.Extreme, got {pair!r}"
                )
            self.add(prefix + name, *pair)

    def merge(self, other: MetricSums) -> None:
        """Add another's sums and micro-batch extremes (a step's, once it is known to be
        good), before any reduction over processes."""
        for name, (value, count) in other._totals.items():
            self.add(name, value, count)
        for name, (kind, extremes) in other._extremes.items():
            for local in extremes:
                self.add_extreme(name, Extreme(local, kind))  # type: ignore[arg-type]

    def reduce(self, accelerator: Any = None) -> dict[str, float]:
        """Σsum/Σcount over every process; a metric whose total count is 0 is left out."""
        return means(self.totals(accelerator))

    def totals(self, accelerator: Any = None) -> dict[str, tuple[float, float]]:
        """``name -> (Σsum, Σcount)`` over every process (every process must call this); an
        extreme's pair is the sum and number of its micro-batches' extremes over every
        process."""
        names = sorted(self._totals)
        extremes = {n: (kind, len(v)) for n, (kind, v) in self._extremes.items()}
        distributed = accelerator is not None and accelerator.num_processes > 1
        if distributed:
            from accelerate.utils import gather_object

            gathered = gather_object([(names, extremes)])
            names = sorted({n for group, _ in gathered for n in group})
            extremes = {}
            for _, group in gathered:
                for name, (kind, length) in group.items():
                    extremes[name] = (kind, max(length, extremes.get(name, (kind, 0))[1]))
        out: dict[str, tuple[float, float]] = {}
        if names:
            zero = torch.zeros((), dtype=torch.float64)
            stacked = torch.stack(
                [torch.stack([t.cpu() for t in self._totals.get(n, [zero, zero])]) for n in names]
            )
            if distributed:
                device = accelerator.device
                stacked = accelerator.reduce(stacked.to(device), reduction="sum").cpu()
            out = {n: (s, c) for n, (s, c) in zip(names, stacked.tolist(), strict=True)}
        for name, (value, count) in self._reduced_extremes(extremes, accelerator).items():
            before = out.get(name, (0.0, 0.0))
            out[name] = (before[0] + value, before[1] + count)
        return out

    def _reduced_extremes(
        self, extremes: Mapping[str, tuple[str, int]], accelerator: Any
    ) -> dict[str, tuple[float, float]]:
        """``name -> (sum, count)`` of each micro-batch's extreme over every process (the
        ``i``-th micro-batches of the processes make one micro-batch: they run in step)."""
        if not extremes:
            return {}
        names = sorted(extremes)
        width = max(length for _, length in extremes.values())
        local = torch.full((len(names), width), float("nan"), dtype=torch.float64)
        for row, name in enumerate(names):
            values = self._extremes.get(name, ("min", []))[1]
            if values:
                local[row, : len(values)] = torch.stack([v.cpu() for v in values])
        every = local.unsqueeze(0)
        if accelerator is not None and accelerator.num_processes > 1:
            gathered = accelerator.gather(local.to(accelerator.device)).cpu()
            every = gathered.view(accelerator.num_processes, len(names), width)
        missing = every.isnan()
        low = every.masked_fill(missing, float("inf")).amin(0)
        high = every.masked_fill(missing, float("-inf")).amax(0)
        seen = ~missing.all(0)
        out = {}
        for row, name in enumerate(names):
            chosen = low[row] if extremes[name][0] == "min" else high[row]
            kept = chosen[seen[row]]
            out[name] = (float(kept.sum()), float(kept.numel()))
        return out

    def add_totals(self, totals: Mapping[str, tuple[Any, Any]]) -> None:
        """Add ``name -> (sum, count)`` totals: another's ``totals()`` (a step's, once it is
        known to be good), or those a checkpoint saved."""
        for name, (value, count) in totals.items():
            self.add(name, value, count)

    def clear(self) -> None:
        self._totals.clear()
        self._extremes.clear()


TERM_PREFIX = "loss/"  # a multi-term loss's terms, as metrics

# Logged cumulatively over the run (totals over every process, not means): TRL's num_tokens,
# each sequence's real tokens in full (prompt included, once per sequence; an on-policy round's
# prompts and completions once per round, as TRL's GRPO counts them), and the positions the
# training forwards computed (a prompt a packed batch shares once; a reused round every time).
TOKEN_COUNTS = ("num_tokens", "num_tokens_computed")


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
