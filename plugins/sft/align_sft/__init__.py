"""Supervised fine-tuning: the ``sft`` objective (shared/objectives.md §1).

Registered through the ``align`` entry-point group; the loss lives in ``align_sft.loss`` and
imports torch only when a run needs it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import align


class SFTOptions(align.Options):
    normalization: Literal["token", "sequence"] = Field(
        "token",
        description="token: mean over every completion token of the accumulated batch (as TRL); "
        "sequence: mean over sequences of each sequence's token mean.",
    )


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="sft",
            description="Supervised fine-tuning: negative log-likelihood of completion tokens.",
            shapes=("prompt_completion", "conversation"),
            options=SFTOptions,
            packable=True,
        )
    )


@align.hookimpl
def align_loss_counts(batch, options):
    from .loss import sft_counts

    return sft_counts(batch, options.normalization)


@align.hookimpl
def align_compute_loss(model, batch, options):
    from .loss import sft_loss

    return sft_loss(model, batch, options.normalization)
