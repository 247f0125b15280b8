"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al. 2024)."""

from pydantic import Field

import align


class SimPOOptions(align.Options):
    beta: float = Field(2.0, gt=0, description="β, the reward scale.")
    gamma: float = Field(0.5, ge=0, description="γ, the target reward margin.")


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="simpo",
            description="SimPO: length-normalised log-prob rewards with a target margin.",
            shapes=("preference",),
            options=SimPOOptions,
        )
    )


@align.hookimpl
def align_compute_loss(model, batch, options):
    from .loss import simpo_loss

    return simpo_loss(model, batch, options.beta, options.gamma)
