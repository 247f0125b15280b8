"""The comparison's results: a table (Markdown and JSON) and the kept-vs-learned plot.

One row per run (and one for the starting model): the grid's values, the steps and seconds it
trained, then for each held-out set the mean reward of its greedy answers (each eval reward that
applies to the set) and its answers' NLL. The plot puts the first held-out set (the task being
learned) on the x axis and each other set (what the model should keep) on the y axis of a panel
of its own: one curve per objective and option values, through its learning rates (the mean
over seeds, each seed a faint point), and the starting model as a star; a row of panels by the
first eval reward's mean (when the sets have one) and a row by the NLL; up and to the right is
better (NLL axes are inverted). So "at equal learning, who forgets less" is read off the picture.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .evaluate import NLL
from .files import write_atomic, write_json, write_text
from .runner import CellState

TABLE_MD = "results.md"
TABLE_JSON = "results.json"
PLOT = "kept-vs-learned.png"


def rows(states: Sequence[CellState], start: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The table's rows, as results.json holds them."""
    out = []
    if start is not None:
        out.append({"run": "starting model", "status": "-", "sets": start})
    for state in states:
        cell = state.cell
        row: dict[str, Any] = {
            "run": cell.name,
            "objective": cell.objective,
            **{key: value for key, value in cell.values},
            "seed": cell.seed,
            "status": state.status,
            "steps": _steps_trained(state),
            "seconds": state.run.get("seconds"),
            "sets": state.results,
        }
        if state.run.get("failure"):
            row["failure"] = state.run["failure"]
        out.append(row)
    return out


def _steps_trained(state: CellState) -> int | None:
    """The steps a run took: all of them once completed; a stopped run's up to its stop, a
    failed run's before the step that failed (run.json's total_steps is the plan)."""
    run = state.run
    if state.status == "completed":
        return run.get("total_steps")
    if run.get("stopped_at_step") is not None:
        return run["stopped_at_step"]
    if run.get("failed_at_step") is not None:
        return run["failed_at_step"] - 1
    return None


def metric_columns(table: Sequence[dict[str, Any]], sets: Sequence[str]) -> list[tuple[str, str]]:
    """(set, metric) pairs in order: each set's rewards, then its NLL."""
    columns = []
    for name in sets:
        rewards: list[str] = []
        for row in table:
            for metric in (row.get("sets") or {}).get(name, {}):
                if metric not in rewards and metric not in _COUNTS and metric != NLL:
                    rewards.append(metric)
        columns += [(name, metric) for metric in rewards] + [(name, NLL)]
    return columns


_COUNTS = ("examples", "answer_tokens", "truncated", "skipped")


def markdown(
    table: Sequence[dict[str, Any]],
    sets: Sequence[str],
    axes: Sequence[str],
    shared: dict[str, Any] | None = None,
) -> str:
    """The table; ``axes`` are the grid's varied options (its columns), ``shared`` the values
    every run that has the option takes (a line above the table)."""
    columns = metric_columns(table, sets)
    head = ["run", *axes, "seed", "steps", "status"] + [f"{s} {m}" for s, m in columns]
    align_right = [False] + [True] * len(axes) + [True, True, False] + [True] * len(columns)
    lines = []
    if shared:
        given = ", ".join(f"{k} {_shown(v)}" for k, v in shared.items())
        lines += [f"Every run (with the option): {given}.", ""]
    lines += [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---:" if r else "---" for r in align_right) + " |",
    ]
    for row in table:
        cells = [row["run"], *(_shown(row.get(a)) for a in axes)]
        cells += [_shown(row.get("seed")), _shown(row.get("steps")), row.get("status", "")]
        for name, metric in columns:
            value = ((row.get("sets") or {}).get(name) or {}).get(metric)
            cells.append(_number(value, 2 if metric == NLL else 3))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def _number(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}"


def write_tables(
    out: Path,
    table: list[dict[str, Any]],
    sets: Sequence[str],
    axes: Sequence[str],
    shared: dict[str, Any],
    plan: Any,
) -> str:
    text = markdown(table, sets, axes, shared)
    write_text(out / TABLE_MD, text)
    write_json(out / TABLE_JSON, {"plan": plan, "rows": table})
    return text


# -- the plot -------------------------------------------------------------------------------------
def score_of(sets: dict[str, Any] | None, name: str, nll: bool = False) -> tuple[float | None, str]:
    """The figure a set is plotted by: its first reward's mean (unless ``nll``), else its NLL."""
    found = (sets or {}).get(name) or {}
    for metric, value in found.items():
        if metric not in _COUNTS and metric != NLL and not nll:
            return value, metric
    return found.get(NLL), NLL


def plot(
    out: Path, table: Sequence[dict[str, Any]], sets: Sequence[str], varied: Sequence[str]
) -> Path | None:
    """kept-vs-learned.png; None when there is no second set to plot against the first or no
    matplotlib (``pip install 'align-core[plot]'``)."""
    if len(sets) < 2:
        return None
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure = figure_of(table, sets, varied, out.name)
    target = out / PLOT
    try:
        write_atomic(target, lambda tmp: figure.savefig(tmp, dpi=100))
    finally:
        plt.close(figure)
    return target


def figure_of(
    table: Sequence[dict[str, Any]], sets: Sequence[str], varied: Sequence[str], title: str
) -> Any:
    """The figure :func:`plot` saves: a panel per kept set, the learned set on every x axis; a
    row of panels by the rewards' means when the sets have rewards, and a row by the NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned, kept = sets[0], list(sets[1:])
    rewarded = any(score_of(row.get("sets"), name)[1] != NLL for row in table for name in sets)
    rows = [False, True] if rewarded else [True]  # NLL only?
    figure, axes = plt.subplots(
        len(rows), len(kept), figsize=(6 * len(kept), 4.5 * len(rows)), squeeze=False
    )
    curves = _curves(table, varied)
    for row_index, nll in enumerate(rows):
        for axis, keep in zip(axes[row_index], kept, strict=True):
            _panel(axis, table, curves, learned, keep, nll)
    figure.suptitle(f"kept vs learned ({title}); point labels: learning rate")
    figure.tight_layout()
    return figure


def _panel(
    axis: Any,
    table: Sequence[dict[str, Any]],
    curves: dict[str, dict[Any, list[Any]]],
    learned: str,
    keep: str,
    nll: bool,
) -> None:
    x_metric = y_metric = NLL
    for index, (label, points) in enumerate(sorted(curves.items())):
        colour = f"C{index % 10}"
        means = []
        for lr, seeds in sorted(points.items(), key=lambda item: _order(item[0])):
            xs, ys = [], []
            for sets_of in seeds:
                x, x_metric = score_of(sets_of, learned, nll)
                y, y_metric = score_of(sets_of, keep, nll)
                if x is not None and y is not None:
                    xs.append(x)
                    ys.append(y)
            if not xs:
                continue
            if len(xs) > 1:
                axis.scatter(xs, ys, color=colour, alpha=0.3, s=12)
            means.append((sum(xs) / len(xs), sum(ys) / len(ys), lr))
        if means:
            axis.plot([m[0] for m in means], [m[1] for m in means], "o-", color=colour, label=label)
            for x, y, lr in means:
                if lr is not None:
                    axis.annotate(
                        _shown(lr), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                    )
    start = next((r for r in table if r["run"] == "starting model"), None)
    if start is not None:
        x, x_metric = score_of(start["sets"], learned, nll)
        y, y_metric = score_of(start["sets"], keep, nll)
        if x is not None and y is not None:
            axis.plot([x], [y], "k*", markersize=12, label="starting model")
    axis.set_xlabel(f"learned: {learned} {_axis_label(x_metric)}")
    axis.set_ylabel(f"kept: {keep} {_axis_label(y_metric)}")
    if x_metric == NLL:
        axis.invert_xaxis()
    if y_metric == NLL:
        axis.invert_yaxis()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def _axis_label(metric: str) -> str:
    return f"{metric} (lower is better)" if metric == NLL else metric


def _curves(
    table: Sequence[dict[str, Any]], varied: Sequence[str]
) -> dict[str, dict[Any, list[Any]]]:
    """label (objective and its values of the varied axes but lr) → lr → each seed's sets."""
    curves: dict[str, dict[Any, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for row in table:
        if row["run"] == "starting model" or not row.get("sets"):
            continue
        options = [f"{k} {_shown(row[k])}" for k in varied if k != "lr" and k in row]
        label = " ".join([row["objective"], *options])
        curves[label][row.get("lr")].append(row["sets"])
    return curves


def _order(lr: Any) -> float:
    return lr if isinstance(lr, int | float) and not math.isnan(lr) else math.inf
