"""The MinorSFT loss (Xie et al. 2024, arXiv 2408.10642).

The paper's gradient is ``∇L = −E[(2/m)·σ(−β·Δ)·∇logπθ(y|x)]`` with ``Δ = logπθ(y|x) −
logπref(y|x)`` summed over the m completion tokens. A loss with exactly that gradient is

    L_i = (2 / (β·m_i)) · softplus(−β·Δ_i),    L = mean over the batch,

since ``d softplus(−βΔ)/dΔ = −β·σ(−βΔ)``. At initialisation (Δ = 0) the weight 2σ(0) = 1 makes
the gradient that of SFT with per-sequence token means (``normalization=sequence``); as the
policy moves away from the reference on an example, its weight 2σ(−βΔ) falls below 1.

``length_normalized`` (a deviation from the paper; torchrl's ``SFTLoss(loss_function=
"minor_sft")`` normalises the same way) puts the per-token log-ratio Δ/m inside σ:

    L_i = (2/β) · softplus(−β·Δ_i/m_i),   gradient −(2/m)·σ(−βΔ/m)·∇logπθ(y|x),

so the weight 2σ(−βΔ/m) no longer falls faster on longer answers. Unlike torchrl it keeps the
2/β factor, so the first step is still SFT's per-sequence mean.

Metrics: ``nll`` (token mean), ``minor_weight`` (mean weight, 2σ(−βΔ) or 2σ(−βΔ/m)) and
``deviation`` (mean Δ/m, the paper's m_θ).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import align
from align.reference.deviation import deviation_terms


def minorsft_example_losses(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    tokens: torch.Tensor,
    beta: float,
    length_normalized: bool = False,
) -> torch.Tensor:
    """Per-sequence losses from summed log-probs and token counts: the paper's
    ``(2/(β·m))·softplus(−β·Δ)``, or ``(2/β)·softplus(−β·Δ/m)`` when ``length_normalized``."""
    delta = policy_logps - reference_logps
    m = tokens.clamp(min=1)
    if length_normalized:
        return 2 / beta * F.softplus(-beta * delta / m)
    return 2 / (beta * m) * F.softplus(-beta * delta)


def minor_weights(
    delta: torch.Tensor, tokens: torch.Tensor, beta: float, length_normalized: bool = False
) -> torch.Tensor:
    """Each sequence's weight on SFT's gradient: ``2σ(−βΔ)``, or ``2σ(−βΔ/m)``."""
    if length_normalized:
        delta = delta / tokens.clamp(min=1)
    return 2 * torch.sigmoid(-beta * delta)


def minorsft_loss(
    model: Any,
    batch: dict[str, Any],
    reference: Any,
    beta: float,
    length_normalized: bool = False,
) -> align.LossOutput:
    policy = align.forward_logps(model, batch)
    ref = reference.sequence_logps(batch)
    tokens = policy.num_tokens
    losses = minorsft_example_losses(policy.sums, ref, tokens, beta, length_normalized)
    delta = policy.sums.detach() - ref
    n = len(losses)
    return align.LossOutput(
        loss=losses.sum(),
        count=n,
        metrics={
            "nll": (-policy.sums.detach().sum(), tokens.sum()),
            "minor_weight": (minor_weights(delta, tokens, beta, length_normalized).sum(), n),
            "deviation": (deviation_terms(policy.sums.detach(), ref, tokens).sum(), n),
        },
    )
