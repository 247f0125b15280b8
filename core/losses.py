"""Losses that more than one objective uses, for plugins to share through the public API (no
plugin imports another's code): the DPO family of pair losses, which ``dpo`` trains on fixed
pairs and ``online-dpo`` on pairs of the policy's own samples, and TRL's preference metrics.

With ``Δ = logπθ(y|x) − logπref(y|x)`` (sums over completion tokens) and ``z = Δ_w − Δ_l``:

- ``sigmoid``: ``−(1−ε)·logσ(βz) − ε·logσ(−βz)``; ε = ``label_smoothing`` (conservative DPO),
  ε = 0 is DPO's ``L = −E[logσ(β(Δ_w − Δ_l))]`` (Rafailov et al. 2023, eq. 7).
- ``ipo``: ``((Δ_w/m_w − Δ_l/m_l) − 1/(2β))²`` with m the number of completion tokens (IPO,
  length-normalised as TRL and the IPO authors do).
- ``hinge``: ``relu(1 − βz)`` (SLiC).
- ``robust``: ``[(1−ε)·(−logσ(βz)) − ε·(−logσ(−βz))] / (1−2ε)`` (Chowdhury et al. 2024).
- ``minor``: MinorDPO, ``−logσ(β(Δ_w − max(0, Δ_l)))``: the rejected answer is pushed down only
  while it is above the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "minor")


def dpo_pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """One loss per pair from the policy's and the reference's sequence log-probs."""
    delta_w, delta_l = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "ipo":
        margin = delta_w / chosen_tokens - delta_l / rejected_tokens
        return (margin - 1 / (2 * beta)) ** 2
    if loss_type == "minor":
        delta_l = delta_l.clamp(min=0)
    z = beta * (delta_w - delta_l)
    eps = label_smoothing
    if loss_type in ("sigmoid", "minor"):
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "robust":
        return ((1 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}")


def preference_metrics(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> dict[str, tuple[torch.Tensor, int]]:
    """TRL's DPO metrics as ``(sum, count)`` pairs over the pairs of a micro-batch."""
    pairs = len(chosen)
    chosen_rewards, rejected_rewards = (
        beta * (chosen - ref_chosen),
        beta * (rejected - ref_rejected),
    )
    return {
        "rewards/chosen": (chosen_rewards.sum(), pairs),
        "rewards/rejected": (rejected_rewards.sum(), pairs),
        "rewards/accuracies": ((chosen_rewards > rejected_rewards).sum(), pairs),
        "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), pairs),
        "logps/chosen": (chosen.sum(), pairs),
        "logps/rejected": (rejected.sum(), pairs),
    }


@torch.no_grad()
def token_metrics(policy: Any, chosen: torch.Tensor) -> dict[str, tuple[torch.Tensor, Any]]:
    """TRL's per-token metrics of DPO and KTO as ``(sum, count)`` pairs over completion tokens:
    ``entropy`` (the policy's, every completion token), ``logits/chosen`` and
    ``logits/rejected`` (the mean over the vocabulary of the logits at each completion token,
    then over the tokens of the chosen or desirable sequences, and of the others).

    ``policy``: :func:`align.forward_logps`'s result, asked for ``entropy`` and
    ``mean_logits``; ``chosen``: one boolean per sequence, in the batch's order."""
    tokens = policy.num_tokens
    logits = policy.per_sequence(policy.mean_logits)
    chosen = chosen.to(tokens.device).bool()
    return {
        "entropy": (policy.entropy.sum(), tokens.sum()),
        "logits/chosen": (logits[chosen].sum(), tokens[chosen].sum()),
        "logits/rejected": (logits[~chosen].sum(), tokens[~chosen].sum()),
    }


@torch.no_grad()
def token_accuracy(policy: Any, rows: Any = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``mean_token_accuracy`` as ``(sum, count)``: the completion tokens whose argmax
    prediction is the target, over those of the sequences ``rows`` selects (all by default)."""
    correct = policy.per_sequence(((policy.predictions == policy.targets) * policy.mask).float())
    return correct[rows].sum(), policy.num_tokens[rows].sum()
