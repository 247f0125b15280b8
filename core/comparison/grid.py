"""The grid of a comparison: objectives × option values × seeds, each point an ordinary run.

An axis is an option and the values it takes (``lr: [1e-4, 1e-3]``, ``beta: [0.1, 0.01]``). A
core option applies to every objective; an objective's option only to the objectives that have
it (``beta`` varies MinorSFT's runs and leaves SFT's alone, which then run once per value of
the other axes); ``SECTION.KEY`` names a plugin section's option (``lora.r``), and
``OBJECTIVE.KEY`` one objective's option only. An axis no objective of the grid takes is an
error, with a did-you-mean.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..options import CORE_KEYS
from ..plugins.api import Preset, option_keys
from ..suggest import did_you_mean

CORE_AXIS = "core"  # what an axis on a core option is applied as
OBJECTIVE_AXIS = "objective"
SECTION_AXIS = "section"
# Options a grid cannot vary, and why.
NOT_AXES = {
    "seed": "give the seeds with --seeds N (seeds=N) or --seed A,B",
    "objective": "list the objectives with --objective A,B (objectives=[...])",
    "output_dir": "every run has its own directory under the comparison's",
    "resume": "--resume continues the whole comparison",
    "overwrite": "align compare does not replace runs",
    "num_processes": "align compare trains its runs in this process, one after another",
    "push_to_hub": "push the model you choose after the comparison",
}


@dataclass(frozen=True)
class Cell:
    """One run of the grid: an objective, the value of each axis that applies to it, a seed."""

    objective: str
    values: tuple[tuple[str, Any], ...]  # (axis key, value), in the grid's axis order
    seed: int
    named_keys: tuple[str, ...] = field(default=(), compare=False)  # axes with several values

    @property
    def name(self) -> str:
        """A directory name: ``minorsft-beta0.01-lr0.001-seed0`` (the axes that vary)."""
        parts = [self.objective]
        parts += [f"{_short(k)}{_text(v)}" for k, v in self.values if k in self.named_keys]
        parts.append(f"seed{self.seed}")
        return _safe("-".join(parts))

    def value(self, key: str) -> Any:
        return dict(self.values).get(key)


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _text(value: Any) -> str:
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


@dataclass
class Grid:
    """The objectives, the axes (key → values, in order) and the seeds."""

    objectives: list[str]
    axes: dict[str, list[Any]]
    seeds: list[int]

    def cells(self, registry: Any) -> list[Cell]:
        """Every run, objective by objective: the product of the axes that apply to it, then
        the seeds. Raises ConfigError for an axis that applies to no objective."""
        kinds = {key: axis_kind(registry, key, self.objectives) for key in self.axes}
        named = tuple(key for key, values in self.axes.items() if len(values) > 1)
        cells = []
        for objective in self.objectives:
            keys = [k for k in self.axes if applies(registry, k, kinds[k], objective)]
            for combo in itertools.product(*(self.axes[k] for k in keys)):
                for seed in self.seeds:
                    values = tuple(zip(keys, combo, strict=True))
                    cells.append(Cell(objective, values, seed, named))
        names = [c.name for c in cells]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"two runs of the grid would share the name {twice[0]!r}")
        return cells

    def as_dict(self) -> dict[str, Any]:
        return {"objectives": self.objectives, "axes": self.axes, "seeds": self.seeds}


def objective_name(registry: Any, name: str) -> str:
    """The objective ``name`` trains (a preset's target); an unknown one is a PluginError with
    the registry's did-you-mean."""
    item = registry.objective(name).item
    return item.objective if isinstance(item, Preset) else item.name


def axis_kind(registry: Any, key: str, objectives: Sequence[str], given_as: str = "--set") -> str:
    """What ``key`` sets: a core option, an objective's option, or a section's; refused when no
    objective of the grid takes it (the error names it as ``given_as KEY``)."""
    if key in CORE_KEYS:
        return CORE_AXIS
    if key in registry.sections:  # lora=True: the section's switch or its options
        return SECTION_AXIS
    head, dot, tail = key.partition(".")
    if dot and head in registry.sections:
        if tail not in option_keys(registry.sections[head].item.options):
            known = option_keys(registry.sections[head].item.options)
            raise ConfigError(
                f"{given_as} {key}: section {head!r} has no option {tail!r}."
                f"{did_you_mean(tail, known)}"
            )
        return SECTION_AXIS
    targets = {objective_name(registry, o) for o in objectives}
    if dot:
        if head not in targets:
            raise ConfigError(
                f"{given_as} {key}: {head!r} is neither an objective of the comparison "
                f"({', '.join(sorted(targets))}) nor a plugin section."
                f"{did_you_mean(head, [*targets, *registry.sections])}"
            )
        keys = option_keys(registry.objectives[head].item.options)
        if tail not in keys:
            raise ConfigError(
                f"{given_as} {key}: objective {head!r} has no option {tail!r}."
                f"{did_you_mean(tail, keys)}"
            )
        return OBJECTIVE_AXIS
    known: set[str] = set()
    for target in targets:
        known |= set(option_keys(registry.objectives[target].item.options))
    if key not in known:
        suggestion = did_you_mean(key, {*known, *CORE_KEYS})
        raise ConfigError(
            f"{given_as} {key}: no objective of the comparison ({', '.join(sorted(targets))}) "
            f"has an option {key!r}, and it is no core option.{suggestion}"
        )
    return OBJECTIVE_AXIS


def applies(registry: Any, key: str, kind: str, objective: str) -> bool:
    """Whether the axis ``key`` varies the runs of ``objective``."""
    if kind in (CORE_AXIS, SECTION_AXIS):
        return True
    target = objective_name(registry, objective)
    head, dot, tail = key.partition(".")
    if dot:
        return head == target
    return key in option_keys(registry.objectives[target].item.options)


def split_values(text: str) -> list[str]:
    """``"1e-4,3e-4"`` → ``["1e-4", "3e-4"]``: an axis's values as given, each stripped."""
    values = [v.strip() for v in str(text).split(",")]
    if any(not v for v in values):
        raise ConfigError(f"{text!r}: an empty value in a comma-separated list")
    return values


def check_axes(axes: Mapping[str, Sequence[Any]]) -> None:
    for key, values in axes.items():
        if key in NOT_AXES:
            raise ConfigError(f"{key!r} is not an axis: {NOT_AXES[key]}")
        if not values:
            raise ConfigError(f"grid axis {key!r} has no values")
        texts = [_text(v) for v in values]
        if len(set(texts)) != len(texts):
            raise ConfigError(f"grid axis {key!r} repeats a value: {', '.join(texts)}")
