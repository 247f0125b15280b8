"""Per-token and per-sequence log-probabilities of completion tokens.

Logits at positions ``0..L-2`` predict the tokens at ``1..L-1``; the target's log-softmax is
taken in float32, and positions outside the completion mask contribute 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TokenLogps:
    """Shifted per-token log-probs ``[B, L-1]`` with their mask, and the logits they came from."""

    logps: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor

    @property
    def sums(self) -> torch.Tensor:
        """``logp(y|x)``: the sum over completion tokens, one value per sequence."""
        return self.logps.sum(-1)

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.mask.sum(-1)


def token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted target log-probs (float32, 0 where masked) and the shifted mask."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps, mask


def forward_logps(model: Any, batch: dict[str, torch.Tensor], prefix: str = "") -> TokenLogps:
    """Run the model on ``batch`` (keys optionally prefixed) and return its token log-probs."""
    input_ids = batch[f"{prefix}input_ids"]
    logits = model(
        input_ids=input_ids, attention_mask=batch[f"{prefix}attention_mask"], use_cache=False
    ).logits
    logps, mask = token_logps(logits, input_ids, batch[f"{prefix}completion_mask"])
    return TokenLogps(logps=logps, mask=mask, logits=logits)
