"""The MinorSFT loss (Xie et al. 2024, arXiv 2408.10642).

The paper's gradient is ``∇L = −E[(2/m)·σ(−β·Δ)·∇logπθ(y|x)]`` with ``Δ = logπθ(y|x) −
logπref(y|x)`` summed over the m completion tokens. A loss with exactly that gradient is

    L_i = (2 / (β·m_i)) · softplus(−β·Δ_i),    L = mean over the batch,

since ``d softplus(−βΔ)/dΔ = −β·σ(−βΔ)``. At initialisation (Δ = 0) the weight 2σ(0) = 1 makes
the gradient that of SFT with per-sequence token means (``normalization=sequence``); as the
policy moves away from the reference on an example, its weight 2σ(−βΔ) falls below 1.

Metrics: ``nll`` (token mean), ``minor_weight`` (mean 2σ(−βΔ)) and ``deviation`` (mean Δ/m, the
paper's m_θ).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import align
from align.reference.deviation import deviation_terms


def minorsft_example_losses(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, tokens: torch.Tensor, beta: float
) -> torch.Tensor:
    """``(2/(β·m))·softplus(−β·Δ)`` per sequence from summed log-probs and token counts."""
    delta = policy_logps - reference_logps
    return 2 / (beta * tokens.clamp(min=1)) * F.softplus(-beta * delta)


def minorsft_loss(
    model: Any, batch: dict[str, Any], reference: Any, beta: float
) -> align.LossOutput:
    policy = align.forward_logps(model, batch)
    ref = reference.sequence_logps(batch)
    tokens = policy.num_tokens
    losses = minorsft_example_losses(policy.sums, ref, tokens, beta)
    delta = policy.sums.detach() - ref
    n = len(losses)
    return align.LossOutput(
        loss=losses.sum(),
        count=n,
        metrics={
            "nll": (-policy.sums.detach().sum(), tokens.sum()),
            "minor_weight": ((2 * torch.sigmoid(-beta * delta)).sum(), n),
            "deviation": (deviation_terms(policy.sums.detach(), ref, tokens).sum(), n),
        },
    )
