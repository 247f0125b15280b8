"""The DPO family of losses (Rafailov et al. 2023, eq. 7, and its variants).

With ``Δ = logπθ(y|x) − logπref(y|x)`` (sums over completion tokens) and ``z = Δ_w − Δ_l``:

- ``sigmoid``: ``−(1−ε)·logσ(βz) − ε·logσ(−βz)``; ε = ``label_smoothing`` (conservative DPO),
  ε = 0 is DPO's ``L = −E[logσ(β(Δ_w − Δ_l))]``.
- ``ipo``: ``((Δ_w/m_w − Δ_l/m_l) − 1/(2β))²`` with m the number of completion tokens (IPO,
  length-normalised as TRL and the IPO authors do).
- ``hinge``: ``relu(1 − βz)`` (SLiC).
- ``robust``: ``[(1−ε)·(−logσ(βz)) − ε·(−logσ(−βz))] / (1−2ε)`` (Chowdhury et al. 2024).
- ``minor``: MinorDPO, ``−logσ(β(Δ_w − max(0, Δ_l)))``: the rejected answer is pushed down only
  while it is above the reference.

Metrics, named as TRL names them, are means over pairs: ``rewards/chosen`` = βΔ_w,
``rewards/rejected`` = βΔ_l, ``rewards/accuracies`` = share with βΔ_w > βΔ_l (strict),
``rewards/margins`` = βΔ_w − βΔ_l, ``logps/chosen`` and ``logps/rejected`` (policy sums).
"""

from __future__ import annotations

from typing import Any

import align
from align.losses import dpo_pair_losses, preference_metrics


def dpo_loss(model: Any, batch: dict[str, Any], reference: Any, options: Any) -> align.LossOutput:
    """One forward over ``[chosen; rejected]``; the reference's log-probs for the same rows."""
    policy = align.forward_logps(model, batch)
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
    return align.LossOutput(loss=losses.sum(), count=pairs, metrics=metrics)
