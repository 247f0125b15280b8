"""Direct Preference Optimization: the ``dpo`` objective (shared/objectives.md §2).

Registered through the ``align`` entry-point group; the loss lives in ``align_dpo.loss`` and
imports torch only when a run needs it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

import align

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "minor")


class DPOOptions(align.Options):
    beta: float = Field(
        0.1, gt=0, description="Strength of the KL penalty towards the reference (β)."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "minor"] = Field(
        "sigmoid",
        description="sigmoid: DPO (eq. 7), conservative DPO with label_smoothing; ipo: "
        "length-normalised IPO; hinge: SLiC; robust: robust DPO; minor: MinorDPO.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Probability ε that a preference label is flipped (sigmoid and robust only).",
    )

    @model_validator(mode="after")
    def _smoothing_applies(self) -> DPOOptions:
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(
                f"label_smoothing applies to loss_type sigmoid and robust, not {self.loss_type}"
            )
        return self


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="dpo",
            description="Direct Preference Optimization on prompt/chosen/rejected pairs.",
            shapes=("preference",),
            options=DPOOptions,
            needs_reference=True,
            packable=True,
            disable_dropout=True,
        )
    )


@align.hookimpl
def align_compute_loss(model, batch, options, reference):
    from .loss import dpo_loss

    return dpo_loss(model, batch, reference, options)
