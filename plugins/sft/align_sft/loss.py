"""The SFT loss.

``L = −(1/N_tok) Σ_batch Σ_{t∈completion} log πθ(y_t | x, y_<t)``  (normalization=token), or
``L = (1/B) Σ_i [ −(1/m_i) Σ_t log πθ(y_t | x, y_<t) ]``  (normalization=sequence).

The hook returns the numerator and its count; the core divides by the count summed over the
accumulated batch and all processes.
"""

from __future__ import annotations

from typing import Any

import align
from align.losses import token_accuracy


def sft_counts(batch: dict[str, Any], normalization: str) -> dict[str, Any]:
    """The loss units of a batch, known before its forward: completion tokens, or sequences."""
    tokens = align.sequence_token_counts(batch)
    return {"loss": tokens.sum() if normalization == "token" else (tokens > 0).sum()}


def sft_loss(model: Any, batch: dict[str, Any], normalization: str) -> align.LossOutput:
    out = align.forward_logps(model, batch, entropy=True)
    nll = -out.sums
    tokens = out.num_tokens
    if normalization == "token":
        loss, count = nll.sum(), tokens.sum()
    else:
        loss, count = (nll / tokens.clamp(min=1)).sum(), (tokens > 0).sum()
    metrics = {
        "mean_token_accuracy": token_accuracy(out),
        "entropy": (out.entropy.sum(), tokens.sum()),
    }
    return align.LossOutput(loss=loss, count=count, metrics=metrics)
