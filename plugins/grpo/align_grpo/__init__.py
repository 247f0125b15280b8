"""Group Relative Policy Optimization: the ``grpo`` objective (Shao et al. 2024, DeepSeekMath).

Registered through the ``align`` entry-point group. On-policy: for every prompt the core samples
``num_generations`` completions from the policy and scores them with the run's reward functions
(``--reward``); ``align_prepare_rollouts`` turns each group's rewards into advantages
(``align_grpo.advantages``) and the loss is TRL 1.16's clipped surrogate with its four
normalisations (``align_grpo.loss``). torch is imported only when a run needs it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

import align

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


class GRPOOptions(align.Options):
    num_generations: int = Field(
        8,
        ge=2,
        description="G: completions sampled for each prompt (a group); a micro-batch holds "
        "batch_size × G completions.",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        description="μ: optimizer steps trained on one round of rollouts. Above 1, the later "
        "steps weigh each token by the clipped ratio π_θ/π_old to the sampling policy.",
    )
    epsilon: float = Field(
        0.2, ge=0, description="ε: the ratio π_θ/π_old is clipped to [1 − ε, 1 + ε_high]."
    )
    epsilon_high: float | None = Field(
        None,
        ge=0,
        description="ε_high, the upper clip bound (DAPO's clip-higher; the paper uses 0.28); "
        "default: epsilon.",
    )
    beta: float = Field(
        0.0,
        ge=0,
        description="β: weight of the per-token KL to the reference (k3 estimator); 0 loads no "
        "reference.",
    )
    use_bias_correction_kl: bool = Field(
        True,
        description="Multiply the per-token KL by the ratio π_θ/π_old, which makes its gradient "
        "the unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's default). It changes the "
        "gradient even when the ratio is 1.",
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo",
        description="How token losses are averaged: dapo, over every completion token of the "
        "step; grpo, per sequence then over sequences; dr_grpo, over sequences × "
        "max_completion_length; bnpo, per micro-batch's tokens then over micro-batches.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide the advantages by the rewards' standard deviation within each group "
        "(group, true), over the whole round (batch), or not at all (none, false; Dr. GRPO).",
    )
    mask_truncated_completions: bool = Field(
        False,
        description="Leave completions that reached max_completion_length without EOS out of "
        "the loss (DAPO).",
    )

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _boolean_scale(cls, value: Any) -> Any:
        """TRL's booleans: ``True`` is ``group``, ``False`` is ``none``."""
        if isinstance(value, bool):
            return "group" if value else "none"
        return value

    @property
    def epsilon_upper(self) -> float:
        """ε_high, or ε when it is not set."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="grpo",
            description="Group Relative Policy Optimization: samples completions for each "
            "prompt, scores them with reward functions and trains on group-relative "
            "advantages (GRPO, Dr. GRPO, DAPO and BNPO losses).",
            shapes=("prompt_only",),
            options=GRPOOptions,
            needs_reference=lambda options: options.beta > 0,
            sampling=lambda options: align.Sampling(
                options.num_generations, options.num_iterations
            ),
            packable=True,
        )
    )


@align.hookimpl
def align_prepare_rollouts(model, batches, options, run):
    from .advantages import prepare_rollouts

    return prepare_rollouts(model, batches, options, run)


@align.hookimpl
def align_loss_counts(batch, options, config):
    from .loss import loss_counts

    return loss_counts(batch, options, config.max_completion_length)


@align.hookimpl
def align_compute_loss(model, batch, options, reference, run):
    from .loss import grpo_loss

    length = run.config.max_completion_length if options.loss_type == "dr_grpo" else None
    return grpo_loss(model, batch, options, reference, length, run.config.temperature)
