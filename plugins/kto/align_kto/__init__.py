"""Kahneman-Tversky Optimization: the ``kto`` objective (shared/objectives.md §3).

Registered through the ``align`` entry-point group. Each example's mismatched partner (its prompt
with another prompt's completion, for the reference point z0) is fixed when the data is
prepared (``align_kto.partners``); the loss lives in ``align_kto.loss``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import align


class KTOOptions(align.Options):
    beta: float = Field(0.1, gt=0, description="Scale of the reward inside the utility (β).")
    desirable_weight: float = Field(
        1.0, gt=0, description="λ_D: weight of the desirable examples' losses."
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="λ_U: weight of the undesirable examples' losses."
    )
    utility: Literal["logistic", "kahneman-tversky"] = Field(
        "logistic",
        description="logistic: the paper's 1 − σ(gain); kahneman-tversky: the slope-bounded "
        "canonical power value function (α=0.88, λ=2.25), harder to optimise.",
    )


def derived_metrics(values: dict[str, float]) -> dict[str, float]:
    """``rewards/margins``: the difference of the two class means (when both classes were seen)."""
    if "rewards/chosen" in values and "rewards/rejected" in values:
        return {"rewards/margins": values["rewards/chosen"] - values["rewards/rejected"]}
    return {}


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="kto",
            description="Kahneman-Tversky Optimization on prompt/completion/label feedback.",
            shapes=("feedback",),
            options=KTOOptions,
            needs_reference=True,
            derived_metrics=derived_metrics,
            packable=True,
            disable_dropout=True,
        )
    )


@align.hookimpl
def align_prepare_dataset(examples, options, split, config):
    from .partners import add_mismatched_partners, warn_if_imbalanced

    if split == "train":
        warn_if_imbalanced(examples, options.desirable_weight, options.undesirable_weight)
    source = config.data if split == "train" else config.eval_data
    return add_mismatched_partners(examples, config.seed, config.max_length, split, source)


@align.hookimpl
def align_compute_loss(model, batch, options, reference, run):
    from .loss import kto_loss

    return kto_loss(model, batch, reference, options, run.accelerator)
