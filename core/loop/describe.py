"""How a run names what it trains: its folder, the banner's title, the trainable parameters.

A preset is called by its name (``lora-sft``); a plain objective by its own, with each plugin
section switched on added (``dpo + LoRA`` in the banner, ``dpo-lora`` in the default folder
name): see :class:`align.plugins.api.Section`'s ``active`` and ``label``.
"""

from __future__ import annotations

from typing import Any

from ..config import RunSpec


def active_sections(spec: RunSpec, registry: Any) -> list[tuple[str, str]]:
    """``(name, label)`` of each section the run switches on."""
    found = []
    for name, options in spec.sections.items():
        section = registry.sections[name].item
        on = section.active(options) if section.active else getattr(options, "enabled", False)
        if on is True:
            found.append((name, section.label or name))
    return found


def sections_on(spec: RunSpec, registry: Any) -> list[tuple[str, str]]:
    """:func:`active_sections`, but for those the run's preset switches on (its name says so)."""
    preset = registry.objectives[spec.preset].item if spec.preset else None
    named = set(preset.sections) if preset is not None else set()
    return [(name, label) for name, label in active_sections(spec, registry) if name not in named]


def run_title(spec: RunSpec, registry: Any) -> str:
    """``lora-sft``, ``dpo + LoRA``, ``sft``."""
    base = spec.preset or spec.objective.item.name
    return " + ".join([base, *(label for _, label in sections_on(spec, registry))])


def run_name(spec: RunSpec, registry: Any) -> str:
    """The default folder's name before its time: ``lora-sft``, ``dpo-lora``, ``sft``."""
    base = spec.preset or spec.objective.item.name
    return "-".join([base, *(name for name, _ in sections_on(spec, registry))])


def parameter_counts(model: Any) -> tuple[int, int]:
    """``(trainable, all)`` parameters, as PEFT counts them for a PEFT model (a 4-bit weight's
    packed elements counted as the weights they hold), else every parameter's ``numel``."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_share(trainable: int, total: int) -> str:
    """``trainable: 1.2M of 124M parameters (0.97%)``."""
    share = 100 * trainable / total if total else 0.0
    digits = 0 if share == 100 else (2 if share >= 0.01 else 4)
    return f"trainable: {_count(trainable)} of {_count(total)} parameters ({share:.{digits}f}%)"


def _count(number: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= size:
            return f"{number / size:.3g}{unit}"
    return str(number)
