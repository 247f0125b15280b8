"""MinorSFT: the ``minorsft`` objective (Xie et al. 2024; shared/objectives.md §4).

Registered through the ``align`` entry-point group; the loss lives in ``align_minorsft.loss``
and imports torch only when a run needs it.
"""

from __future__ import annotations

from pydantic import Field

import align


class MinorSFTOptions(align.Options):
    beta: float = Field(
        0.01,
        gt=0,
        description="β: how fast an example's weight 2σ(−βΔ) falls as the policy moves away "
        "from the reference on it; Δ is summed over the answer's tokens, so the weight falls "
        "faster on longer answers (README: how to pick β).",
    )
    length_normalized: bool = Field(
        False,
        description="Put the per-token log-ratio Δ/m inside σ instead of the paper's summed Δ: "
        "the weight 2σ(−βΔ/m) no longer depends on the answer's length (a deviation from the "
        "paper, torchrl's normalisation; the 2/β factor is kept, so the first step is SFT's). "
        "β then counts nats per token: raise it (0.1 to 0.3), at 0.01 the weight hardly falls.",
    )


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="minorsft",
            description="MinorSFT: SFT whose per-example weight shrinks as the policy deviates "
            "from the reference.",
            shapes=("prompt_completion", "conversation"),
            options=MinorSFTOptions,
            needs_reference=True,
            packable=True,
            disable_dropout=True,
        )
    )


@align.hookimpl
def align_compute_loss(model, batch, options, reference):
    from .loss import minorsft_loss

    return minorsft_loss(model, batch, reference, options.beta, options.length_normalized)
