"""The reward model's loss: Bradley–Terry on preference pairs (Ouyang et al. 2022, eq. 1;
Llama 2's margin, Touvron et al. 2023, eq. 2), with TRL's centring term (Eisenstein et al. 2023)::

    L(x, y_c, y_r) = −log σ(r(x, y_c) − r(x, y_r) − m) + c · (r(x, y_c) + r(x, y_r))²

``r`` is the model's score of prompt and answer (one number per sequence: the classifier head
at its last token), ``m`` the pair's ``margin`` (a record field, 0 when absent) and ``c`` the
``center_rewards_coefficient`` (the term is left out when it is None, TRL's default). The loss
is returned as (Σ over pairs, number of pairs), so gradient accumulation and N processes give
the mean over every pair of the step, as one large batch would.

Metrics, under TRL's names: ``accuracy`` (the share of pairs whose chosen answer scores higher,
ties counted wrong), ``margin`` (the mean of ``r_c − r_r``), ``mean_reward`` (the mean score of
every sequence, chosen and rejected), and ``min_reward``/``max_reward``: the smallest and
largest score of each micro-batch over every process, averaged over the micro-batches since
the last log (TRL's ``all_rewards.min()``/``max()`` of a step, then the mean over the logging
interval).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import align


def pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Each pair's loss (see the module docstring), from its two scores."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def reward_model_loss(model: Any, batch: dict[str, Any], options: Any) -> align.LossOutput:
    """One forward over ``[chosen; rejected]`` (padded or packed); the pairs' summed loss."""
    scores = align.sequence_scores(model, batch)
    pairs = scores.shape[0] // 2
    chosen, rejected = scores[:pairs], scores[pairs:]
    margin = batch.get("margin")
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=scores.dtype, device=scores.device)
    losses = pair_losses(chosen, rejected, margin, options.center_rewards_coefficient)
    with torch.no_grad():
        rewards = scores.detach()
        difference = chosen.detach() - rejected.detach()
        metrics = {
            "accuracy": ((difference > 0).float().sum(), pairs),
            "margin": (difference.sum(), pairs),
            "mean_reward": (rewards.sum(), rewards.numel()),
            "min_reward": align.Extreme(rewards, "min"),
            "max_reward": align.Extreme(rewards, "max"),
        }
    return align.LossOutput(loss=losses.sum(), count=pairs, metrics=metrics)
