"""The KTO loss (Ethayarajh et al. 2024, eqs. 7–8).

With the reward ``r = logπθ(y|x) − logπref(y|x)`` (unscaled) and the reference point
``z0 = max(0, mean over mismatched pairs of logπθ(y'|x) − logπref(y'|x))`` (no gradient, taken
per micro-step over every process's pairs), the gain is ``g = β(r − z0)`` for a desirable
example and ``g = β(z0 − r)`` for an undesirable one, and

- ``utility=logistic`` (the paper's): ``loss = w·(1 − σ(g))``;
- ``utility=kahneman-tversky``: ``loss = −w·v(g)`` with the canonical value function made
  slope-bounded, ``v(g) = (max(g,0)+ε)^α − ε^α`` for g ≥ 0 and
  ``−λ_KT·((max(−g,0)+ε)^α − ε^α)`` for g < 0 (α=0.88, λ_KT=2.25, ε=1e-3). Each branch sees
  a clamped one-sided input, never ``|g|``: the gradient of ``|g|`` at exactly 0 is 0, and at
  step 1 every gain is 0 (policy = reference, z0 = 0), so the run would never move. The
  slope jumps at 0 (2.016 above, 4.54 below), and at step 1 a gain is 0 only up to float
  noise (a precomputed reference, another layout or a micro-batch of another size gives
  ±1e-6 in float32, ±5e-4 in bf16): so within the dead band ``|g| ≤ ε`` the gradient is the
  gain side's slope at 0, ``s0 = α·ε^(α−1) ≈ 2.016``, whatever the sign of g, and the
  step-1 gradient is the same in every set-up. The value there stays ``v(g)``; ``s0`` lies
  between the one-sided slopes found within ε of g (a Goldstein ε-subgradient). The step-1
  loss is 0 up to that noise (not 0.5·w as for ``logistic``),

where ``w`` is ``desirable_weight`` (λ_D) or ``undesirable_weight`` (λ_U); the loss is the mean
over examples. Metrics: ``kl`` (z0), ``rewards/chosen`` and ``rewards/rejected`` (βr means over
desirable and undesirable examples), ``logps/chosen`` and ``logps/rejected``, and TRL's token
metrics ``entropy``, ``logits/chosen`` and ``logits/rejected`` (:func:`align.losses.token_metrics`,
over the completion tokens of the trained examples, not the mismatched pairs), reduced as sums
and counts so a micro-batch without one class gives no NaN.
"""

from __future__ import annotations

from typing import Any

import torch

import align
from align.losses import token_metrics

KT_ALPHA, KT_LAMBDA, KT_EPSILON = 0.88, 2.25, 1e-3
# The dead band |g| <= KT_BAND around the kink at 0, where the gradient is the gain side's slope
# at 0. Float noise makes a step-1 gain ±1e-6 (float32) to ±5e-4 (bf16) at β = 0.1 instead of
# exactly 0; the band is the value function's own smoothing scale ε, above both.
KT_BAND = KT_EPSILON
KT_SLOPE_AT_ZERO = KT_ALPHA * KT_EPSILON ** (KT_ALPHA - 1)  # ≈ 2.016


def kahneman_tversky_value(gain: torch.Tensor) -> torch.Tensor:
    """The slope-bounded power value function: concave for gains, steeper for losses.

    ``clamp`` passes the gradient at its bound (``max(g,0)`` has slope 1 at g = 0), so at
    g = 0 the gain branch's slope α·ε^(α−1) applies; ``where`` zeroes the other branch's.
    Within ``|g| ≤ KT_BAND`` the value is the same but the gradient is that slope at 0 for
    either sign, so float noise around a gain of 0 (step 1) cannot pick the slope.
    """
    floor = KT_EPSILON**KT_ALPHA
    gains = (gain.clamp(min=0) + KT_EPSILON) ** KT_ALPHA - floor
    losses = (torch.neg(gain).clamp(min=0) + KT_EPSILON) ** KT_ALPHA - floor
    value = torch.where(gain >= 0, gains, -KT_LAMBDA * losses)
    banded = value.detach() + KT_SLOPE_AT_ZERO * (gain - gain.detach())
    return torch.where(gain.abs() <= KT_BAND, banded, value)


def kto_example_losses(
    rewards: torch.Tensor,
    z0: torch.Tensor | float,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    utility: str = "logistic",
) -> torch.Tensor:
    """One loss per example from its unscaled reward r, the reference point z0 and its label."""
    sign = torch.where(desirable, 1.0, -1.0).to(rewards.dtype)
    gain = beta * sign * (rewards - z0)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(rewards.dtype)
    if utility == "logistic":
        return weight * (1 - torch.sigmoid(gain))
    if utility == "kahneman-tversky":
        return -weight * kahneman_tversky_value(gain)
    raise ValueError(f"unknown KTO utility {utility!r}")


def reference_point(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, accelerator: Any = None
) -> torch.Tensor:
    """z0: the mean mismatched log-ratio over every process's pairs, clamped at 0, detached."""
    ratios = (policy_logps - reference_logps).detach().double()
    totals = torch.stack([ratios.sum(), torch.tensor(float(len(ratios)), device=ratios.device)])
    if accelerator is not None and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).clamp(min=0).float()


def kto_loss(
    model: Any, batch: dict[str, Any], reference: Any, options: Any, accelerator: Any
) -> align.LossOutput:
    with torch.no_grad():
        mismatched = align.forward_logps(model, batch, "mismatched_").sums
    z0 = reference_point(mismatched, reference.sequence_logps(batch, "mismatched_"), accelerator)
    out = align.forward_logps(model, batch, entropy=True, mean_logits=True)
    policy = out.sums
    rewards = policy - reference.sequence_logps(batch)
    desirable = batch["labels"].bool()
    losses = kto_example_losses(
        rewards,
        z0,
        desirable,
        options.beta,
        options.desirable_weight,
        options.undesirable_weight,
        options.utility,
    )
    scaled = options.beta * rewards.detach()
    logps = policy.detach()
    n_desirable, n_undesirable = desirable.sum(), (~desirable).sum()
    return align.LossOutput(
        loss=losses.sum(),
        count=len(losses),
        metrics={
            "kl": (z0, 1),
            "rewards/chosen": (scaled[desirable].sum(), n_desirable),
            "rewards/rejected": (scaled[~desirable].sum(), n_undesirable),
            "logps/chosen": (logps[desirable].sum(), n_desirable),
            "logps/rejected": (logps[~desirable].sum(), n_undesirable),
            **token_metrics(out, desirable),
        },
    )
