"""The deviation metric m_θ (Xie et al. 2024, MinorSFT; shared/objectives.md §4).

``m_θ = mean over (x, y) of (logπθ(y|x) − logπref(y|x)) / m``: the log-ratio to the reference
per completion token, so it compares across β, answer lengths and corpora. ``--eval-deviation``
logs it as ``eval_deviation`` on every row of the batch the loss saw (for preference batches,
chosen and rejected alike), against the run's reference or, for objectives without one, the
starting model.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.logprobs import forward_logps


def deviation_terms(policy_logps: torch.Tensor, reference_logps: torch.Tensor, tokens: Any) -> Any:
    """Per-sequence ``Δ/m``; sequences without completion tokens count as 0."""
    return (policy_logps - reference_logps) / torch.as_tensor(tokens).clamp(min=1)


@torch.no_grad()
def deviation_sums(model: Any, batch: dict[str, Any], reference: Any) -> tuple[Any, int]:
    """``(Σ Δ/m, number of sequences)`` for the rows of ``batch``."""
    policy = forward_logps(model, batch)
    terms = deviation_terms(policy.sums, reference.sequence_logps(batch), policy.num_tokens)
    return terms.sum(), len(terms)
