"""The DPO family of losses (Rafailov et al. 2023, eq. 7: ``L = −E[logσ(β(Δ_w − Δ_l))]`` with
``Δ = logπθ(y|x) − logπref(y|x)``, and its variants ``sigmoid`` with label smoothing, ``ipo``,
``hinge``, ``robust`` and ``minor``), one forward over ``[chosen; rejected]``. The pair losses
and TRL's metrics live in the core, ``align.losses``, where online DPO reuses them; their
docstrings give every variant's equation.
"""

from __future__ import annotations

from typing import Any

import torch

import align
from align.losses import dpo_pair_losses, preference_metrics, token_accuracy, token_metrics


def dpo_loss(model: Any, batch: dict[str, Any], reference: Any, options: Any) -> align.LossOutput:
    """One forward over ``[chosen; rejected]``; the reference's log-probs for the same rows."""
    policy = align.forward_logps(model, batch, entropy=True, mean_logits=True)
    ref = reference.sequence_logps(batch)
    pairs = len(ref) // 2
    logps, tokens = policy.sums, policy.num_tokens
    losses = dpo_pair_losses(
        logps[:pairs],
        logps[pairs:],
        ref[:pairs],
        ref[pairs:],
        tokens[:pairs],
        tokens[pairs:],
        options.beta,
        options.loss_type,
        options.label_smoothing,
    )
    metrics = preference_metrics(
        logps[:pairs].detach(), logps[pairs:].detach(), ref[:pairs], ref[pairs:], options.beta
    )
    chosen = torch.arange(len(ref), device=logps.device) < pairs
    metrics.update(token_metrics(policy, chosen))
    metrics["mean_token_accuracy"] = token_accuracy(policy, slice(0, pairs))  # chosen, as TRL
    return align.LossOutput(loss=losses.sum(), count=pairs, metrics=metrics)
