"""Leave-one-out advantages, once per round of sampling, as TRL 1.16's
``RLOOTrainer._generate_and_score_completions`` computes them.

For the k completions ``y_1..y_k`` of a prompt ``x``, each with reward ``r_i`` (the weighted sum
of the reward functions, ``batch["rewards"]``), RLOO (Ahmadian et al. 2024, arXiv 2402.14740)
estimates the policy gradient with each sample's own baseline, the mean reward of the others::

    1/k Σ_i [ R(y_i, x) − 1/(k−1) Σ_{j≠i} R(y_j, x) ] ∇ log π(y_i | x)

    R(y_i, x) = clip(r_i, reward_clip_range) − β · KL_i
    KL_i      = Σ_t [ log π_old(y_{i,t} | x, y_{i,<t}) − log π_ref(y_{i,t} | x, y_{i,<t}) ]

so the advantage is ``A_i = R_i − mean_{j≠i} R_j`` (= ``k/(k−1) · (R_i − mean_j R_j)``). The whole
completion is one action: the KL is the first-order log-ratio of the sequence (which can be
negative), summed over its completion tokens and subtracted from the reward before the baseline
(the paper's KL-shaped reward; TRL's ``per_token_kl = old_per_token_logps −
ref_per_token_logps``). ``π_old`` is the policy that sampled the round, scored under no
gradient at the sampling temperature, as the reference is. With ``mask_truncated_completions`` a
completion without EOS has no tokens in the KL (its KL is 0), as in TRL, and its reward still
enters its group's baselines.

With ``normalize_advantages`` the advantages are then standardised over the whole round, every
micro-batch on every process (TRL's generation batch): ``(A − mean) / (std + 1e-4)``, ``std``
unbiased. ``batch["zero_std"]`` marks the completions whose group's rewards ``R`` (clipped and
KL-penalised) all equal (``frac_reward_zero_std``). Rewards are always finite here (the core
refuses a reward function's ``None`` or NaN), so TRL's handling of unscorable completions never
applies.

Kept in each batch, one value per sequence: ``advantages``, ``zero_std``, ``kl`` (β > 0, for the
``kl`` metric) and, with ``num_iterations > 1``, ``old_logps`` (``log π_old(y|x)`` over the
tokens in the loss) for the importance ratio of the later steps.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

import align

from .loss import loss_mask

STD_EPSILON = 1e-4  # TRL: advantages / (std + 1e-4)


def leave_one_out(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``r_i − mean_{j≠i} r_j`` over each completion's group (its prompt's completions)."""
    _, inverse = torch.unique(group, return_inverse=True)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = rewards.new_zeros(groups)
    sums = zeros.index_add(0, inverse, rewards)[inverse]
    counts = zeros.index_add(0, inverse, torch.ones_like(rewards))[inverse]
    baselines = (sums - rewards) / (counts - 1)
    return torch.nan_to_num(rewards - baselines, nan=0.0)  # a group of one: no baseline


def zero_std(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Whether each completion's group scored alike (TRL's ``isclose(std, 0)``, unbiased std)."""
    _, std = align.group_statistics(rewards, group)
    std = torch.nan_to_num(std, nan=0.0)  # a group of one: as TRL's zeros
    return torch.isclose(std, torch.zeros_like(std))


def _policy_and_reference(
    model: Any, batch: dict[str, Any], options: Any, reference: Any, temperature: float
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(log π_old(y|x), KL)`` per sequence over the tokens in the loss: the old log-probs
    when ``num_iterations > 1``, the KL when β > 0 (None where not needed)."""
    policy = align.forward_logps(model, batch, temperature=temperature)
    mask = loss_mask(policy, batch, options)
    old = policy.per_sequence(policy.logps * mask) if options.num_iterations > 1 else None
    kl = None
    if options.beta > 0:
        ref = reference.token_logps(batch, temperature=temperature).to(policy.logps.device)
        kl = policy.per_sequence((policy.logps - ref) * mask)
    return old, kl


def prepare_rollouts(
    model: Any, batches: list[dict[str, Any]], options: Any, reference: Any, run: Any
) -> list[dict[str, Any]]:
    """Add ``advantages``, ``zero_std`` and, as needed, ``kl`` and ``old_logps`` to every
    rollout batch of a round (in place; the list is returned)."""
    accelerator = getattr(run, "accelerator", None)
    temperature = run.config.temperature if run is not None else 1.0
    if options.beta > 0 or options.num_iterations > 1:
        autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            for batch in batches:
                old, kl = _policy_and_reference(model, batch, options, reference, temperature)
                if old is not None:
                    batch["old_logps"] = old.detach()
                if kl is not None:
                    batch["kl"] = kl.detach()
    for batch in batches:
        rewards = batch["rewards"].float()
        if options.reward_clip_range is not None:
            rewards = rewards.clamp(*options.reward_clip_range)
        if options.beta > 0:
            rewards = rewards - options.beta * batch["kl"].to(rewards.device, rewards.dtype)
        group = batch["group"].to(rewards.device)
        batch["advantages"] = leave_one_out(rewards, group)
        batch["zero_std"] = zero_std(rewards, group).float()
    if options.normalize_advantages:
        mean, std = align.round_mean_std([b["advantages"] for b in batches], accelerator)
        for batch in batches:
            values = batch["advantages"]
            scaled = (values - mean.to(values.dtype)) / (std.to(values.dtype) + STD_EPSILON)
            batch["advantages"] = torch.nan_to_num(scaled, nan=0.0)
    return batches
