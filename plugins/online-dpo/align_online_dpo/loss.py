"""The online DPO loss of one rollout batch, and TRL's ``OnlineDPOTrainer`` metrics.

With ``Δ = logπθ(y|x) − logπref(y|x)`` (sums over completion tokens) for the chosen (w) and the
rejected (l) sample of a prompt and ``z = Δ_w − Δ_l``:

- ``sigmoid``: ``−logσ(βz)`` (DPO, Rafailov et al. 2023, eq. 7; OAIF's default).
- ``ipo``: ``(z − 1/(2β))²``, on sequence sums as TRL's ``OnlineDPOTrainer`` computes it (the
  ``dpo`` objective's ipo divides each Δ by its completion's length, as TRL's ``DPOTrainer``).
- ``hinge``: ``relu(1 − βz)`` (SLiC); ``minor``: ``−logσ(β(Δ_w − max(0, Δ_l)))`` (MinorDPO).

The loss is the sum over pairs (prompts) and the count the number of pairs; the core divides by
the step's total, so the step's loss is TRL's mean over pairs.
"""

from __future__ import annotations

from typing import Any

import torch

import align
from align.losses import dpo_pair_losses, preference_metrics

from .pairs import KEYS, with_pairs


def online_dpo_loss(
    model: Any, batch: dict[str, Any], reference: Any, options: Any
) -> align.LossOutput:
    """One forward over the batch's sequences; the pair of each prompt picked by its rewards.

    Policy and reference are scored alike at temperature 1, not at the sampling temperature:
    the DPO loss is about the model's own distribution, and TRL 1.16's ``OnlineDPOTrainer``
    scores so (its ``_forward`` takes ``log_softmax`` of the raw logits)."""
    if not all(key in batch for key in KEYS):  # not seen by align_prepare_rollouts
        batch = with_pairs(batch, options.missing_eos_penalty)
    policy = align.forward_logps(model, batch)
    logps, tokens = policy.sums, policy.num_tokens
    ref = reference.sequence_logps(batch).to(device=logps.device, dtype=logps.dtype)
    chosen = batch["chosen_rows"].to(logps.device)
    rejected = batch["rejected_rows"].to(logps.device)
    pairs = len(chosen)
    if options.loss_type == "ipo":  # TRL's OnlineDPOTrainer: IPO on sums, not per-token means
        chosen_tokens = rejected_tokens = torch.ones_like(logps[chosen])
    else:
        chosen_tokens, rejected_tokens = tokens[chosen], tokens[rejected]
    losses = dpo_pair_losses(
        logps[chosen],
        logps[rejected],
        ref[chosen],
        ref[rejected],
        chosen_tokens,
        rejected_tokens,
        options.beta,
        options.loss_type,
    )
    metrics = online_dpo_metrics(logps.detach(), ref, batch, chosen, rejected, options.beta)
    return align.LossOutput(loss=losses.sum(), count=pairs, metrics=metrics)


def online_dpo_metrics(
    logps: torch.Tensor,
    ref: torch.Tensor,
    batch: dict[str, Any],
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
) -> dict[str, tuple[Any, Any]]:
    """TRL's ``OnlineDPOTrainer`` metrics as ``(sum, count)`` pairs: over pairs (``rewards/*``,
    ``logps/*``, ``objective/scores_margin``, ``beta``) or over sequences (the rest).

    ``objective/kl``, ``objective/entropy`` and so on sum over each completion's tokens only;
    TRL sums over the padded width of its completion tensor, so they differ from TRL's where
    a batch's completions differ in length.
    """
    pairs, sequences = len(chosen), len(logps)
    score = batch["scores"].to(logps.device, torch.float32)
    kl = logps - ref
    non_score_reward = -beta * kl
    contains_eos = ~batch["truncated"].to(logps.device).bool()
    metrics = preference_metrics(logps[chosen], logps[rejected], ref[chosen], ref[rejected], beta)
    metrics.update(
        {
            "objective/kl": (kl.sum(), sequences),
            "objective/entropy": (-logps.sum(), sequences),
            "objective/non_score_reward": (non_score_reward.sum(), sequences),
            "objective/rlhf_reward": ((score + non_score_reward).sum(), sequences),
            "objective/scores": (score.sum(), sequences),
            "objective/scores_margin": ((score[chosen] - score[rejected]).sum(), pairs),
            "val/contain_eos_token": (contains_eos.sum(), sequences),
            "beta": (beta * pairs, pairs),
        }
    )
    return metrics
