"""The ORPO loss (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
Model", arXiv 2403.07691, eqs. 6-7), as TRL 1.16's ``trl.experimental.orpo.ORPOTrainer``.

``L = L_NLL + λ·L_OR``, with ``L_OR = −log σ(log(odds(y_w|x) / odds(y_l|x)))``,
``odds(y|x) = P(y|x) / (1 − P(y|x))`` and ``P(y|x) = exp(mean over completion tokens of
log p(y_t|x, y_<t))``. The NLL is a token mean over the chosen answers' completion tokens, or,
with ``nll_on_prompt``, over every chosen token after the first (TRL's choice). Both terms go to
the core as ``(sum, count)``: it divides each by its count over the accumulated batch and all
processes, then adds them.

Metrics, named as TRL names them, are means over pairs except ``nll_loss`` (a token mean), with
c and r the chosen and rejected mean log-probs: ``rewards/chosen`` = λc, ``rewards/rejected`` = λr,
``rewards/accuracies`` = share with λc > λr (strict), ``rewards/margins`` = λ(c − r),
``logps/chosen`` = c, ``logps/rejected`` = r (means per token, not sums), ``log_odds_ratio`` =
log σ(log odds ratio), unscaled, and ``log_odds_chosen`` = the log odds ratio itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

import align
from align.losses import preference_metrics

from .batch import ODDS_MASK

LN2 = math.log(2)
# Mean log-probs are clamped below 0: at exactly 0 (a float32 model certain of every token),
# log(1 − e^x) is −inf and TRL's gradient NaN. Nothing below the limit changes.
MAX_MEAN_LOGP = -1e-7


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate on both sides of −ln 2 (Mächler 2012).

    ``log(−expm1(x))`` near 0, ``log1p(−exp(x))`` below −ln 2, as TRL's ``log1mexp``; each branch
    sees only inputs it is finite on, so the unused one passes a zero gradient, never a NaN.
    """
    x = x.clamp(max=MAX_MEAN_LOGP)
    near_zero = torch.log(-torch.expm1(x.clamp(min=-LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-LN2)))
    return torch.where(x < -LN2, far, near_zero)


def log_odds_ratio(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> Any:
    """``log(odds(y_w|x) / odds(y_l|x)) = (c − r) − (log(1 − e^c) − log(1 − e^r))`` per pair."""
    c, r = chosen_mean_logps, rejected_mean_logps
    return (c - r) - (log1m_exp(c) - log1m_exp(r))


def orpo_pair_losses(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float
) -> torch.Tensor:
    """The odds-ratio term of each pair, weighted: ``λ·L_OR = −λ·log σ(log OR)`` (eq. 7).

    ``L_ORPO = E[L_SFT + λ·L_OR]`` (eq. 6), ``L_OR = −log σ(log(odds_θ(y_w|x)/odds_θ(y_l|x)))``,
    ``odds_θ(y|x) = P_θ(y|x)/(1 − P_θ(y|x))``, ``P_θ(y|x) = exp((1/m) Σ_t log P_θ(y_t|x, y_<t))``.
    The inputs are those per-token mean log-probs, in float32 or wider.
    """
    return -beta * F.logsigmoid(log_odds_ratio(chosen_mean_logps, rejected_mean_logps))


def completion_mean_logps(policy: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Each sequence's mean log-prob over its completion tokens.

    The core's ``completion_mask`` is the completion itself unless the batch carries
    ``odds_mask`` (``nll_on_prompt``: padded rows whose chosen ``completion_mask`` also covers
    the prompt). That mask is aligned to the rows' width, so padding columns added to the
    core's masks alone change nothing.
    """
    if ODDS_MASK not in batch:
        return policy.sums / policy.num_tokens
    width = batch["input_ids"].shape[1]
    odds = batch[ODDS_MASK]
    mask = F.pad(odds, (0, width - odds.shape[1]))[:, 1:].to(policy.logps.dtype)
    return (policy.logps * mask).sum(-1) / mask.sum(-1)


def orpo_loss(model: Any, batch: dict[str, Any], beta: float) -> align.LossOutput:
    """One forward over ``[chosen; rejected]``: the NLL term and the odds-ratio term."""
    policy = align.forward_logps(model, batch)
    pairs = len(policy.sums) // 2
    nll_sum, nll_count = -policy.sums[:pairs].sum(), policy.num_tokens[:pairs].sum()
    means = completion_mean_logps(policy, batch)
    chosen, rejected = means[:pairs], means[pairs:]
    losses = orpo_pair_losses(chosen, rejected, beta)
    metrics = orpo_metrics(chosen.detach(), rejected.detach(), beta)
    metrics["nll_loss"] = (nll_sum.detach(), nll_count)
    return align.LossOutput(
        terms={"nll": (nll_sum, nll_count), "odds_ratio": (losses.sum(), pairs)},
        metrics=metrics,
    )


def orpo_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float
) -> dict[str, tuple[torch.Tensor, int]]:
    """TRL's ORPO pair metrics as ``(sum, count)`` pairs, from the mean log-probs."""
    pairs = len(chosen)
    log_odds = log_odds_ratio(chosen, rejected)
    none = torch.zeros_like(chosen)  # no reference: ORPO's rewards are β · the mean log-probs
    return {
        **preference_metrics(chosen, rejected, none, none, beta),
        "log_odds_ratio": (F.logsigmoid(log_odds).sum(), pairs),
        "log_odds_chosen": (log_odds.sum(), pairs),
    }
