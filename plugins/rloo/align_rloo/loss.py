"""The RLOO loss on a rollout batch, as TRL 1.16's ``RLOOTrainer._compute_loss``: REINFORCE with
the leave-one-out advantages of ``align_rloo.advantages``, the whole completion one action.

RLOO (Ahmadian et al. 2024, arXiv 2402.14740) estimates the gradient of the expected
KL-shaped reward with k samples per prompt, each baselined by the others::

    ∇J(θ) ≈ 1/k Σ_i [ R(y_i, x) − 1/(k−1) Σ_{j≠i} R(y_j, x) ] ∇ log π_θ(y_i | x)

As TRL (and PPO) the step reuses its samples through a sequence-level importance ratio to the
sampling policy, clipped::

    ρ_i = π_θ(y_i | x) / π_old(y_i | x) = exp(Σ_t log π_θ(y_{i,t}|·) − Σ_t log π_old(y_{i,t}|·))
    ℓ_i = −min(ρ_i · A_i, clip(ρ_i, 1 − ε, 1 + ε_high) · A_i)
    L   = 1/N Σ_i ℓ_i                        (N completions of the step)

With ``num_iterations = 1`` every step trains on fresh samples, ``ρ = 1`` and ``∇ℓ_i =
−A_i ∇log π_θ(y_i|x)``: the paper's estimator. With ``μ > 1`` the later steps of a round
weigh each completion by its clipped ratio (``batch["old_logps"]``).

Normalisation. TRL takes the mean of ``ℓ_i`` over each micro-batch
(``per_sequence_loss.mean()``) and the Trainer divides by the gradient-accumulation steps, and
DDP averages over processes: a mean of micro-batch means. align returns the sum of ``ℓ_i`` and
counts the completions, and the core divides the step's total sum by its total count over
every micro-batch and process: the mean over every completion of the step. The two are equal
whenever the micro-batches hold the same number of completions (TRL's always do); where a
step's last micro-batch is smaller, align still weighs every completion alike, so gradient
accumulation and N processes train on exactly the loss of one large batch.

With ``mask_truncated_completions`` a completion without EOS has no tokens in the loss: its
``log π`` sums are 0, so ``ρ = 1`` and ``ℓ_i = −A_i`` adds a constant with no gradient, and it
still counts as a completion, as in TRL.

Metrics, TRL's names: ``entropy`` (the policy's per-token entropy) and ``kl`` (β > 0: the
per-token log-ratio ``log π_old − log π_ref`` the reward was penalised with), ``(sum, count)``
over the completion tokens in the loss; over completions, ``clip_ratio/low_mean`` (ρ < 1 − ε
with A < 0), ``clip_ratio/high_mean`` (ρ > 1 + ε_high with A > 0), ``clip_ratio/region_mean``
(either) and ``frac_reward_zero_std``; ``clip_ratio/low_min`` and ``clip_ratio/high_max``, the
smallest and largest of the micro-batch's per-completion clip flags on any process
(``align.Extreme``).
"""

from __future__ import annotations

from typing import Any

import torch

import align


def loss_counts(batch: dict[str, Any]) -> dict:
    """The loss's count for a rollout batch, known before its forward: its completions."""
    return {"loss": int(batch["group"].shape[0])}


def loss_mask(policy: Any, batch: dict[str, Any], options: Any) -> torch.Tensor:
    """The completion tokens in the loss: all of them, or those of completions that ended in
    EOS (``mask_truncated_completions``)."""
    if options.mask_truncated_completions:
        return policy.mask_without(batch["truncated"])
    return policy.mask


def clipped_sequence_losses(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> torch.Tensor:
    """``−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)`` per completion."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def rloo_loss(
    model: Any, batch: dict[str, Any], options: Any, temperature: float = 1.0
) -> align.LossOutput:
    """One forward over the rollout batch (padded or packed): the sum of ``ℓ_i`` over its
    completions and their number, with log-probs of ``logits / temperature`` (the sampling
    distribution, as TRL scores them)."""
    policy = align.forward_logps(model, batch, temperature=temperature, entropy=True)
    mask = loss_mask(policy, batch, options)
    logps = policy.per_sequence(policy.logps * mask)
    advantages = batch["advantages"].to(logps.device, logps.dtype)
    old = batch.get("old_logps")
    old = logps.detach() if old is None else old.to(logps.device, logps.dtype)
    ratio = torch.exp(logps - old)
    epsilon_low, epsilon_high = options.epsilon, options.epsilon_upper
    per_sequence = clipped_sequence_losses(ratio, advantages, epsilon_low, epsilon_high)
    sequences = int(per_sequence.shape[0])

    tokens = mask.sum().detach()
    metrics: dict[str, Any] = {"entropy": ((policy.entropy * mask).sum(), tokens)}
    if "kl" in batch:
        metrics["kl"] = (batch["kl"].sum(), tokens)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
        region = torch.maximum(low, high)
        metrics["clip_ratio/low_mean"] = (low.sum(), sequences)
        metrics["clip_ratio/high_mean"] = (high.sum(), sequences)
        metrics["clip_ratio/region_mean"] = (region.sum(), sequences)
        metrics["clip_ratio/low_min"] = align.Extreme(low, "min")
        metrics["clip_ratio/high_max"] = align.Extreme(high, "max")
    if "zero_std" in batch:
        metrics["frac_reward_zero_std"] = (batch["zero_std"].sum(), sequences)
    return align.LossOutput(loss=per_sequence.sum(), count=sequences, metrics=metrics)
