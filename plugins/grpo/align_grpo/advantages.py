"""Group-relative advantages, once per round of sampling, as TRL 1.16's GRPOTrainer computes them
(``multi_objective_aggregation="sum_then_normalize"``, its default).

Each completion's reward ``r_i`` (the weighted sum of the reward functions, ``batch["rewards"]``)
is compared with the other completions of its prompt's group (Shao et al. 2024, §4.1.2, outcome
supervision)::

    Â_i = (r_i − mean(r_group)) / (std + 1e-4)

``std`` is the unbiased standard deviation of the group's rewards (``scale_rewards="group"``),
of every reward of the round on every process (``"batch"``, as the PPO Lite paper suggests), or
no division at all (``"none"``: Dr. GRPO, Liu et al. 2025, which finds the division biases the
objective towards questions that are too easy or too hard). Every advantage of a completion
equals that of its tokens.

``batch["zero_std"]`` marks the completions whose ``std`` is 0 (TRL's ``torch.isclose``): their
group all scored alike and gives no learning signal (``frac_reward_zero_std``). With
``num_iterations > 1`` the round is trained on for several steps, so the log-probs of the
sampling policy are kept (``batch["old_logps"]``) for the importance ratio.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

import align

STD_EPSILON = 1e-4  # TRL: advantages / (std + 1e-4)


def advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    scale_rewards: str,
    batch_std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Â, zero_std)`` per completion: the group-relative advantages and whether the standard
    deviation used (the group's, or ``batch_std`` for ``scale_rewards="batch"``) is 0."""
    means, group_std = align.group_statistics(rewards, group)
    std = group_std if scale_rewards != "batch" else batch_std.expand_as(rewards)
    values = rewards - means
    if scale_rewards != "none":
        values = values / (std + STD_EPSILON)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    # A group of one has no baseline (NaN std): no learning signal, as TRL's nan_to_num.
    return torch.nan_to_num(values, nan=0.0), zero_std


def prepare_rollouts(
    model: Any, batches: list[dict[str, Any]], options: Any, run: Any
) -> list[dict[str, Any]]:
    """Add ``advantages``, ``zero_std`` and, with ``num_iterations > 1``, ``old_logps`` to every
    rollout batch of a round (in place; the list is returned)."""
    accelerator = getattr(run, "accelerator", None)
    batch_std = None
    if options.scale_rewards == "batch":
        round_rewards = [b["rewards"] for b in batches]
        std = align.round_mean_std(round_rewards, accelerator)[1]
        batch_std = std.to(round_rewards[0].dtype)
    for batch in batches:
        rewards = batch["rewards"].float()
        values, zero_std = advantages(
            rewards, batch["group"].to(rewards.device), options.scale_rewards, batch_std
        )
        batch["advantages"] = values
        batch["zero_std"] = zero_std.float()
    if options.num_iterations > 1:
        temperature = run.config.temperature if run is not None else 1.0
        autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            for batch in batches:
                tempered = align.forward_logps(model, batch, temperature=temperature)
                batch["old_logps"] = tempered.logps.detach()
    return batches
