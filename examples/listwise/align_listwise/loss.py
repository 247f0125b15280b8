"""The Plackett–Luce (listwise DPO) loss.

For a prompt x with answers y_1 … y_N, each reward is DPO's implicit one,
``r_k = β·(log πθ(y_k|x) − log πref(y_k|x))``. With the answers ordered by score, best first
(``(1), …, (N)``), the loss of the group is the negative log-likelihood of that order under the
Plackett–Luce model of the rewards (Rafailov et al. 2023, appendix A.3):

``L = −Σ_{k=1}^{N−1} [ r_(k) − log Σ_{j=k}^{N} exp r_(j) ]``

With N = 2 this is DPO's ``−log σ(β(Δ_w − Δ_l))``. One loss unit per group (per record); the
core divides the sum over groups by their number. Equal scores are ordered as the answers
appear in the record (a stable sort): of two tied answers, the earlier one is ranked above.
"""

from __future__ import annotations

from typing import Any

import torch

import align


def ranked_below(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[S, S]``: entry ``(k, j)`` is True when answer ``j`` is in ``k``'s group and ranked at
    or below it (``k`` itself included): a lower score, or an equal one later in the record."""
    index = torch.arange(len(scores), device=scores.device)
    lower = scores[None, :] < scores[:, None]
    tied_later = (scores[None, :] == scores[:, None]) & (index[None, :] >= index[:, None])
    return (group[None, :] == group[:, None]) & (lower | tied_later)


def plackett_luce_losses(
    rewards: torch.Tensor, scores: torch.Tensor, group: torch.Tensor, groups: int
) -> torch.Tensor:
    """One loss per group: ``−Σ_k [r_(k) − logsumexp(r_(k..N))]`` over the answers of each group.

    ``rewards``, ``scores`` and ``group`` hold one value per answer (the ``ranked`` batch's
    rows: the answers of group 0, then group 1, …). The last-ranked answer's term is
    ``r_(N) − log exp r_(N) = 0``, so summing over every answer is the sum to N − 1.
    """
    below = ranked_below(scores, group)
    lse = torch.logsumexp(rewards[None, :].masked_fill(~below, float("-inf")), dim=-1)
    terms = rewards - lse
    return -torch.zeros(groups, dtype=terms.dtype, device=terms.device).index_add(0, group, terms)


def listwise_loss(
    model: Any, batch: dict[str, Any], reference: Any, beta: float
) -> align.LossOutput:
    """One forward over every answer of the batch; the reference's log-probs for the same rows."""
    policy = align.forward_logps(model, batch).sums  # the answers of group 0, then group 1, …
    rewards = beta * (policy - reference.sequence_logps(batch))
    scores, group = batch["scores"], batch["group"]
    groups = int(group.max()) + 1
    losses = plackett_luce_losses(rewards, scores, group, groups)
    metrics = listwise_metrics(rewards.detach(), scores, group, groups)
    return align.LossOutput(loss=losses.sum(), count=groups, metrics=metrics)


def listwise_metrics(
    rewards: torch.Tensor, scores: torch.Tensor, group: torch.Tensor, groups: int
) -> dict[str, tuple[torch.Tensor, int]]:
    """Means over groups: the reward of the best-ranked answer (``rewards/top``), of the
    worst-ranked one (``rewards/bottom``), their difference (``rewards/margins``), and the share
    of groups whose best answer has a higher reward than every other answer of its group
    (``rewards/accuracies``)."""
    below = ranked_below(scores, group)
    same = group[None, :] == group[:, None]
    top = below.sum(-1) == same.sum(-1)  # every answer of its group is at or below it
    bottom = below.sum(-1) == 1  # none is below it
    rivals = same & ~torch.eye(len(rewards), dtype=torch.bool, device=rewards.device)
    best_rival = rewards[None, :].masked_fill(~rivals, float("-inf")).amax(-1)
    top_sum, bottom_sum = rewards[top].sum(), rewards[bottom].sum()
    return {
        "rewards/top": (top_sum, groups),
        "rewards/bottom": (bottom_sum, groups),
        "rewards/margins": (top_sum - bottom_sum, groups),
        "rewards/accuracies": ((top & (rewards > best_rival)).sum(), groups),
    }
