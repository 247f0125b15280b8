"""Reward models: the ``reward-model`` objective (TRL 1.16's ``RewardTrainer``).

A sequence classifier with one output (``AutoModelForSequenceClassification``,
``num_labels=1``) scores the chosen and the rejected answer of every preference pair; the
Bradley–Terry loss pushes the chosen one's score above the rejected one's. Registered through
the ``align`` entry-point group; the loss lives in ``align_reward_model.loss`` and imports torch
only when a run needs it.
"""

from __future__ import annotations

from pydantic import Field

import align


class RewardModelOptions(align.Options):
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="Weight of the auxiliary loss (r_chosen + r_rejected)², which keeps the "
        "rewards centred on 0 (Eisenstein et al. 2023; TRL's center_rewards_coefficient, "
        "1e-2 recommended); none by default.",
    )


class PairMargin(align.Fields):
    margin: float = Field(
        0.0,
        description="How much the chosen answer should beat the rejected one by: the loss is "
        "−log σ(r_chosen − r_rejected − margin) (Llama 2's margin; 0 when the column is absent).",
    )


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="reward-model",
            description="Reward model: a scalar head trained on prompt/chosen/rejected pairs "
            "(Bradley–Terry).",
            shapes=("preference",),
            options=RewardModelOptions,
            fields=PairMargin,
            model_class="sequence_classification",
            packable=True,
            disable_dropout=True,
        )
    )


@align.hookimpl
def align_compute_loss(model, batch, options):
    from .loss import reward_model_loss

    return reward_model_loss(model, batch, options)
