"""Online DPO: the ``online-dpo`` objective (Guo et al. 2024, "Direct Language Model Alignment
from Online AI Feedback", OAIF), as TRL's ``OnlineDPOTrainer`` trains it.

For every prompt the core samples two completions from the current policy and scores them with
the run's reward functions (``--reward``); the better one is *chosen*, the other *rejected*
(``align_online_dpo.pairs``), and the pair gets the DPO loss against the reference
(``align_online_dpo.loss``). Registered through the ``align`` entry-point group; torch is
imported only when a run needs it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import align
from align.plugins.api import Sampling

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "minor")


class OnlineDPOOptions(align.Options):
    beta: float = Field(
        0.1, gt=0, description="Strength of the KL penalty towards the reference (β; τ for ipo)."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "minor"] = Field(
        "sigmoid",
        description="sigmoid: DPO; ipo: IPO on sequence log-probs, as TRL's OnlineDPOTrainer "
        "(not length-normalised); hinge: SLiC; minor: MinorDPO (hinge and minor are not in TRL).",
    )
    missing_eos_penalty: float | None = Field(
        None,
        ge=0,
        description="Subtracted from the reward of a completion that ends without EOS (cut at "
        "max_completion_length) before the pair is ordered; none: no penalty.",
    )


def sampling(options: OnlineDPOOptions) -> Sampling:
    """Two completions per prompt, trained on once (TRL samples a fresh pair every step)."""
    return Sampling(num_generations=2)


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="online-dpo",
            description="Online DPO (OAIF): DPO on two sampled completions per prompt, the one "
            "the reward functions score higher chosen.",
            shapes=("prompt_only",),
            options=OnlineDPOOptions,
            needs_reference=True,
            packable=True,
            disable_dropout=True,
            sampling=sampling,
        )
    )


@align.hookimpl
def align_prepare_rollouts(batches, options):
    from .pairs import with_pairs

    return [with_pairs(batch, options.missing_eos_penalty) for batch in batches]


@align.hookimpl
def align_compute_loss(model, batch, options, reference):
    from .loss import online_dpo_loss

    return online_dpo_loss(model, batch, reference, options)
