"""The GRPO loss on a rollout batch, as TRL 1.16's ``GRPOTrainer._compute_loss`` (token-level
importance sampling; loss types ``grpo``, ``dr_grpo``, ``dapo`` and ``bnpo``).

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, eq. 3) maximises, for the G
completions ``o_i`` of a prompt ``q`` sampled from ``π_old``::

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t { min(ρ_{i,t}·Â_i, clip(ρ_{i,t}, 1−ε, 1+ε)·Â_i)
                                    − β·D_KL[π_θ ‖ π_ref]_{i,t} } ]

    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | q, o_{i,<t})
    D_KL[π_θ ‖ π_ref]_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1          (eq. 4, the k3 estimator)

with ``Â_i`` the group-relative advantage (``align_grpo.advantages``). The loss is −J, one value
per completion token (``ℓ_{i,t}``); ``π_old`` is the policy that sampled the round, so with
``num_iterations = 1`` the ratio is 1 (its gradient is still ``∇log π_θ``). DAPO (Yu et al.
2025, arXiv 2503.14476, eq. 8) clips asymmetrically, ``clip(ρ, 1−ε_low, 1+ε_high)``
(``epsilon``, ``epsilon_high``), and averages over every token of the batch instead of per
sequence; Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783)
drops the ``1/|o_i|`` length normalisation, dividing by a constant instead. The normaliser of
each ``loss_type``, as the core's ``(sum, count)`` (it divides the step's total sum by the total
count over all micro-batches and processes):

- ``dapo``: ``Σ ℓ / Σ |o_i|``, every completion token of the step: sum ``Σ ℓ``, count the
  completion tokens.
- ``grpo``: ``mean_i (Σ_t ℓ_{i,t} / |o_i|)``: sum of the per-sequence token means, count the
  sequences.
- ``dr_grpo``: ``Σ ℓ / (N·L_max)``, N sequences and ``L_max = max_completion_length``: sum ``Σ ℓ``,
  count ``N·L_max``.
- ``bnpo``: each micro-batch's token mean, then the mean over micro-batches (TRL normalises per
  local batch and divides by the gradient-accumulation steps): sum the micro-batch's token mean,
  count 1.

With ``mask_truncated_completions`` a completion without EOS has no tokens in the loss: it adds
nothing to ``dapo``'s and ``bnpo``'s token counts, and 0 to ``grpo``'s and ``dr_grpo``'s means
while still counting as a sequence (as in TRL).

Metrics, TRL's names, ``(sum, count)`` over the completion tokens in the loss: ``kl`` (β > 0), the
k3 estimate; ``entropy``, the policy's per-token entropy; ``clip_ratio/low_mean`` (ρ < 1−ε with
Â < 0), ``clip_ratio/high_mean`` (ρ > 1+ε_high with Â > 0) and ``clip_ratio/region_mean``
(either); ``clip_ratio/low_min`` and ``clip_ratio/high_max``, the smallest share of low-clipped
and the largest share of high-clipped tokens of any sequence of the micro-batch on any process
(``align.Extreme``); and over completions ``frac_reward_zero_std``, those whose group (or round,
for ``scale_rewards="batch"``) scored alike.
"""

from __future__ import annotations

from typing import Any

import torch

import align


def loss_counts(batch: dict[str, Any], options: Any, max_completion_length: int | None) -> dict:
    """The loss's count for a rollout batch, known before its forward."""
    sequences = int(batch["group"].shape[0])
    if options.loss_type == "grpo":
        return {"loss": sequences}
    if options.loss_type == "dr_grpo":
        return {"loss": sequences * int(max_completion_length)}
    if options.loss_type == "bnpo":
        return {"loss": 1}
    tokens = align.sequence_token_counts(batch)
    if options.mask_truncated_completions:
        tokens = tokens * (~batch["truncated"].to(tokens.device).bool())
    return {"loss": tokens.sum()}


def clipped_token_losses(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> torch.Tensor:
    """``−min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â)`` per token."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def k3_kl(ref_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate ``π_ref/π_θ − log(π_ref/π_θ) − 1`` (Schulman's k3), ≥ 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def loss_mask(policy: Any, batch: dict[str, Any], options: Any) -> torch.Tensor:
    """The completion tokens in the loss: all of them, or those of completions that ended in
    EOS (``mask_truncated_completions``)."""
    if options.mask_truncated_completions:
        return policy.mask_without(batch["truncated"])
    return policy.mask


def _as_wide_as(old: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """The old log-probs in the width of a padded batch whose padding changed since the round
    (the positions added or removed predict no completion token)."""
    extra = logps.shape[-1] - old.shape[-1]
    if extra > 0:
        return torch.nn.functional.pad(old, (0, extra))
    return old[..., : logps.shape[-1]] if extra < 0 else old


def grpo_loss(
    model: Any,
    batch: dict[str, Any],
    options: Any,
    reference: Any = None,
    max_completion_length: int | None = None,
    temperature: float = 1.0,
) -> align.LossOutput:
    """One forward over the rollout batch (padded or packed): the loss of ``loss_type``, with
    log-probs of ``logits / temperature`` (the sampling distribution, as TRL scores them)."""
    policy = align.forward_logps(model, batch, temperature=temperature, entropy=True)
    logps = policy.logps
    mask = loss_mask(policy, batch, options)
    advantages = policy.per_position(batch["advantages"].to(logps.device, logps.dtype))
    old = batch.get("old_logps")
    old = logps.detach() if old is None else _as_wide_as(old.to(logps.device), logps)
    ratio = torch.exp(logps - old)
    epsilon_low, epsilon_high = options.epsilon, options.epsilon_upper
    per_token = clipped_token_losses(ratio, advantages, epsilon_low, epsilon_high)
    tokens = mask.sum().detach()
    metrics: dict[str, tuple[Any, Any]] = {}
    if options.beta > 0:
        kl = k3_kl(reference.token_logps(batch, temperature=temperature).to(logps.device), logps)
        if options.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + options.beta * kl
        metrics["kl"] = ((kl * mask).sum().detach(), tokens)
    masked = per_token * mask
    sequences = int(batch["advantages"].shape[0])
    if options.loss_type == "dapo":
        loss, count = masked.sum(), tokens
    elif options.loss_type == "grpo":
        lengths = policy.per_sequence(mask).clamp(min=1.0)
        loss, count = (policy.per_sequence(masked) / lengths).sum(), sequences
    elif options.loss_type == "dr_grpo":
        loss, count = masked.sum(), sequences * int(max_completion_length)
    elif options.loss_type == "bnpo":
        loss, count = masked.sum() / tokens.clamp(min=1.0), 1
    else:
        raise ValueError(f"unknown GRPO loss_type {options.loss_type!r}")

    metrics["entropy"] = ((policy.entropy * mask).sum(), tokens)
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"] = ((low * mask).sum(), tokens)
        metrics["clip_ratio/high_mean"] = ((high * mask).sum(), tokens)
        metrics["clip_ratio/region_mean"] = (((low | high) * mask).sum(), tokens)
        # each sequence's share of clipped tokens (NaN for one with no tokens in the loss)
        lengths = policy.per_sequence(mask)
        metrics["clip_ratio/low_min"] = align.Extreme(
            policy.per_sequence(low * mask) / lengths, "min"
        )
        metrics["clip_ratio/high_max"] = align.Extreme(
            policy.per_sequence(high * mask) / lengths, "max"
        )
    if "zero_std" in batch:
        metrics["frac_reward_zero_std"] = (batch["zero_std"].sum(), sequences)
    return align.LossOutput(loss=loss, count=count, metrics=metrics)
