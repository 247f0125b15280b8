"""``align plot RUN_DIR``: the loss and metric curves of a run's ``metrics.jsonl`` as a PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SKIP = {"step", "epoch", "num_tokens", "num_tokens_computed"}
LOG_SCALE_SPAN = 100  # the loss axis is logarithmic when its positive values span 2 decades


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """One panel per metric, training and evaluation values together; returns the PNG path."""
    plt = _pyplot()
    figure = make_figure(run_dir)
    target = Path(output) if output else Path(run_dir) / "metrics.png"
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def make_figure(run_dir: str | Path) -> Any:
    """The figure ``plot_run`` saves: titled with the run, the loss on a log scale when it
    spans decades (a DPO loss falling from 0.69 to 1e-6 is a flat line on a linear one)."""
    plt = _pyplot()
    series = read_series(Path(run_dir) / "metrics.jsonl")
    names = (
        ["loss", *sorted(n for n in series if n != "loss")] if "loss" in series else sorted(series)
    )
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        for split, points in sorted(series[name].items(), reverse=True):
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="o" if split == "eval" else None, label=split)
        if name == "loss" and spans_decades(v for pts in series[name].values() for _, v in pts):
            axis.set_yscale("log")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.legend()
    for axis in list(axes.flat)[len(names) :]:
        axis.set_visible(False)
    figure.suptitle(run_title(run_dir))
    figure.tight_layout()
    return figure


def read_series(path: Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``metric -> split ("train"/"eval") -> [(step, value), …]`` from ``metrics.jsonl``."""
    if not path.exists():
        raise ConfigError(f"{path.parent}: no metrics.jsonl (is it a run directory?)")
    points: dict[str, dict[str, dict[float, float]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int | float):
            raise ConfigError(f"{path}, line {number}: a row without a numeric 'step'")
        for key, value in row.items():
            if key in SKIP or not isinstance(value, int | float):
                continue
            name, split = (key[5:], "eval") if key.startswith("eval_") else (key, "train")
            # the last value of a step wins: a resumed run rewrites the steps it repeats
            points.setdefault(name, {}).setdefault(split, {})[row["step"]] = value
    if not points:
        raise ConfigError(f"{path}: no metrics to plot")
    return {
        name: {split: sorted(values.items()) for split, values in splits.items()}
        for name, splits in points.items()
    }


def spans_decades(values: Iterable[float]) -> bool:
    """Whether a log scale suits these values: all positive and finite, the largest at least
    ``LOG_SCALE_SPAN`` times the smallest."""
    values = list(values)
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        return False
    return max(values) / min(values) >= LOG_SCALE_SPAN


def run_title(run_dir: str | Path) -> str:
    """The run directory's name, and the objective (or preset) ``run.json`` records."""
    path = Path(run_dir).resolve()
    try:
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return path.name
    if not isinstance(info, dict) or not info.get("objective"):
        return path.name
    return f"{path.name} ({info.get('preset') or info['objective']})"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("align plot needs matplotlib: pip install 'align-core[plot]'") from None
    return plt
