"""``align plot RUN_DIR``: the loss and metric curves of a run's ``metrics.jsonl`` as a PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import ConfigError

SKIP = {"step", "epoch", "num_tokens"}


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """One panel per metric, training and evaluation values together; returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("align plot needs matplotlib: pip install 'align-core[plot]'") from None
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (is it a run directory?)")
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
    series = {
        name: {split: sorted(values.items()) for split, values in splits.items()}
        for name, splits in points.items()
    }
    if not series:
        raise ConfigError(f"{path}: no metrics to plot")
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
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.legend()
    for axis in list(axes.flat)[len(names) :]:
        axis.set_visible(False)
    figure.tight_layout()
    target = Path(output) if output else Path(run_dir) / "metrics.png"
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
