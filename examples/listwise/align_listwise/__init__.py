"""Listwise DPO: the Plackett–Luce generalisation of DPO to N ranked answers (Rafailov et al.
2023, appendix A.3; LiPO, Liu et al. 2024), on the core's ``ranked`` data format."""

from pydantic import Field

import align


class ListwiseOptions(align.Options):
    beta: float = Field(0.1, gt=0, description="β, the strength of the KL penalty (as DPO's).")


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="listwise",
            description="Listwise DPO (Plackett–Luce) on prompts with N ≥ 2 ranked answers.",
            shapes=("ranked",),
            options=ListwiseOptions,
            needs_reference=True,
            packable=True,
            disable_dropout=True,
        )
    )


@align.hookimpl
def align_compute_loss(model, batch, options, reference):
    from .loss import listwise_loss

    return listwise_loss(model, batch, reference, options.beta)
