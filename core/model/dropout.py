"""``disable_dropout``: every dropout probability of the policy set to 0 before training.

Objectives that compare the policy with a reference (DPO, KTO, MinorSFT) or run a second,
prediction pass (KTO's reference point, IFT's greedy pass) need the same network in every
forward: with dropout on, DPO's step-1 loss with policy = reference is not ln 2, and the
prediction pass sees another network than the trained one. TRL disables dropout by default
for DPO, KTO and ORPO (``disable_dropout=True``, LoRA's dropout included); the DPO and IFT
reference code train without it too.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

# Names of the floats that hold a dropout probability read at forward time: on modules
# (``attention_dropout`` in Llama/Qwen/Gemma attention, ``*_pdrop`` in older architectures,
# OPT's ``layerdrop``) and on configs that some models read while running (Falcon's
# ``hidden_dropout``).
_PROBABILITY_SUFFIXES = ("dropout", "dropout_p", "dropout_prob", "pdrop", "layerdrop")

# The values the user's configs held, to write them back when a model is saved: by the
# config's id, with a weak reference to tell a reused id apart (configs are unhashable).
_given: dict[int, tuple[weakref.ref, dict[str, float]]] = {}


def _given_values(config: Any, create: bool = False) -> dict[str, float] | None:
    entry = _given.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1]
    if not create:
        return None
    values: dict[str, float] = {}
    _given[id(config)] = (weakref.ref(config), values)
    return values


def resolve(spec: Any, previous_config: dict[str, Any] | None = None) -> None:
    """Fill ``disable_dropout`` when the user did not set it: from the objective; on
    ``--resume``, from ``previous_config`` (the interrupted run's), where a run started before
    the option existed counts as ``False`` (it trained with dropout)."""
    if previous_config is not None:
        previous_config.setdefault("disable_dropout", False)
    cfg = spec.config
    if cfg.disable_dropout is None:
        if previous_config is not None:
            default = previous_config["disable_dropout"]
        else:
            default = spec.objective.item.disable_dropout
        spec.config = cfg.model_copy(update={"disable_dropout": default})


def _is_probability(name: str, value: Any) -> bool:
    return name.lower().endswith(_PROBABILITY_SUFFIXES) and isinstance(value, float)


def _configs(model: Any) -> list[Any]:
    """Every distinct model config the modules read (a composite model has several)."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            found.setdefault(id(config), config)
    return list(found.values())


def disable_dropout(model: Any) -> int:
    """Set every dropout probability in ``model`` to 0: ``nn.Dropout`` modules (PEFT's
    ``lora_dropout`` among them), float attributes that attention code passes to its kernel
    (``attention_dropout``, ``attn_pdrop``, ``layerdrop``, …) and the same keys of the model's
    configs, which some models read at forward time. Returns how many were above 0.

    A saved model keeps the user's config values: :func:`write_model
    <align.checkpoint.write_model>` saves inside :func:`configs_as_given`.
    """
    import torch

    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
            continue
        for name, value in vars(module).items():
            if _is_probability(name, value):
                changed += value > 0
                setattr(module, name, 0.0)
    for config in _configs(model):
        for name, value in list(vars(config).items()):
            if _is_probability(name, value) and value > 0:
                _given_values(config, create=True).setdefault(name, value)
                setattr(config, name, 0.0)
                changed += 1
    return int(changed)


@contextlib.contextmanager
def configs_as_given(model: Any) -> Iterator[None]:
    """While active, the model's configs hold the dropout values the user gave (for saving)."""
    zeroed = [(c, given) for c in _configs(model) if (given := _given_values(c))]
    for config, given in zeroed:
        for name, value in given.items():
            setattr(config, name, value)
    try:
        yield
    finally:
        for config, given in zeroed:
            for name in given:
                setattr(config, name, 0.0)


@contextlib.contextmanager
def eval_mode(model: Any):
    """Dropout off for the duration, then the model's previous mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
