"""``disable_dropout``: every dropout probability of the policy set to 0 before training.

Objectives that compare the policy with a reference (DPO, KTO, MinorSFT) or run a second,
prediction pass (KTO's reference point, IFT's greedy pass) need the same network in every
forward: with dropout on, DPO's step-1 loss with policy = reference is not ln 2, and the
prediction pass sees another network than the trained one. TRL disables dropout by default
for DPO, KTO and ORPO (``disable_dropout=True``, LoRA's dropout included); the DPO and IFT
reference code train without it too.
"""

from __future__ import annotations

from typing import Any

# Attributes that hold a dropout probability read at forward time (``attention_dropout`` in
# Llama/Qwen/Gemma attention, ``*_pdrop`` in older architectures); checked on every module.
_PROBABILITY_SUFFIXES = ("dropout", "dropout_p", "dropout_prob", "pdrop")


def resolve(spec: Any) -> None:
    """Fill ``disable_dropout`` from the objective when the user did not set it."""
    cfg = spec.config
    if cfg.disable_dropout is None:
        default = spec.objective.item.disable_dropout
        spec.config = cfg.model_copy(update={"disable_dropout": default})


def disable_dropout(model: Any) -> int:
    """Set every dropout probability in ``model`` to 0: ``nn.Dropout`` modules (PEFT's
    ``lora_dropout`` among them) and float attributes that attention code passes to its
    kernel (``attention_dropout``, ``attn_pdrop``, …). Returns how many were above 0.

    The model's config is left as it is, so the saved model keeps the user's settings.
    """
    import torch

    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
            continue
        for name, value in vars(module).items():
            if name.lower().endswith(_PROBABILITY_SUFFIXES) and isinstance(value, float):
                changed += value > 0
                setattr(module, name, 0.0)
    return int(changed)
