"""REINFORCE Leave-One-Out: the ``rloo`` objective (Ahmadian et al. 2024, "Back to Basics:
Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs").

Registered through the ``align`` entry-point group. On-policy: for every prompt the core samples
``num_generations`` (k) completions from the policy and scores them with the run's reward
functions (``--reward``); ``align_prepare_rollouts`` subtracts the sequence-level KL to the
reference from each reward and turns the rewards into leave-one-out advantages
(``align_rloo.advantages``); the loss is TRL 1.16's sequence-level clipped surrogate
(``align_rloo.loss``). Options and defaults are those of TRL 1.16's ``RLOOConfig``. torch is
imported only when a run needs it.
"""

from __future__ import annotations

from pydantic import Field, model_validator

import align


class RLOOOptions(align.Options):
    num_generations: int = Field(
        2,
        ge=2,
        description="k: completions sampled for each prompt; each one's baseline is the mean "
        "reward of the other k − 1. A micro-batch holds batch_size × k completions.",
    )
    beta: float = Field(
        0.05,
        ge=0,
        description="β: weight of the sequence-level KL to the reference, Σ_t (log π_old − "
        "log π_ref) over the completion, subtracted from each reward before the baseline; 0 "
        "loads no reference.",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        description="μ: optimizer steps trained on one round of rollouts. Above 1, the later "
        "steps weigh each completion by the clipped sequence ratio π_θ(y|x)/π_old(y|x).",
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
    normalize_advantages: bool = Field(
        False,
        description="Normalise the advantages over the whole round on every process to mean 0 "
        "and standard deviation 1 (with 1e-4 added to the standard deviation).",
    )
    # A list, not a tuple: run.json stores it as a list, and --resume compares the two.
    reward_clip_range: list[float] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[min, max]: clip each completion's reward (the weighted sum of the reward "
        "functions) to this range before the KL penalty; default: no clipping.",
    )
    mask_truncated_completions: bool = Field(
        False,
        description="Leave completions that reached max_completion_length without EOS out of "
        "the loss and the KL (DAPO); their rewards still enter their group's baselines.",
    )

    @model_validator(mode="after")
    def _ordered_clip_range(self) -> RLOOOptions:
        if self.reward_clip_range is not None:
            low, high = self.reward_clip_range
            if low > high:
                raise ValueError(
                    f"reward_clip_range [{low}, {high}]: the minimum is above the maximum"
                )
        return self

    @property
    def epsilon_upper(self) -> float:
        """ε_high, or ε when it is not set."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="rloo",
            description="REINFORCE Leave-One-Out: samples k completions for each prompt, "
            "scores them with reward functions minus a sequence-level KL to the reference, "
            "and trains on each reward minus the mean of the other k − 1.",
            shapes=("prompt_only",),
            options=RLOOOptions,
            needs_reference=lambda options: options.beta > 0,
            sampling=lambda options: align.Sampling(
                options.num_generations, options.num_iterations
            ),
            packable=True,
        )
    )


@align.hookimpl
def align_prepare_rollouts(model, batches, options, reference, run):
    from .advantages import prepare_rollouts

    return prepare_rollouts(model, batches, options, reference, run)


@align.hookimpl
def align_loss_counts(batch):
    from .loss import loss_counts

    return loss_counts(batch)


@align.hookimpl
def align_compute_loss(model, batch, options, run):
    from .loss import rloo_loss

    return rloo_loss(model, batch, options, run.config.temperature)
