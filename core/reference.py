"""Reference log-probs for objectives that declare ``needs_reference``.

Mode ``model``: a frozen copy of the starting model, run without gradients and with dropout
off. The loss hook receives a ``Reference`` and asks it for the sequences it needs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .logprobs import forward_logps


class Reference:
    """Per-sequence reference log-probs, summed over completion tokens like the policy's."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)

    @classmethod
    def frozen_copy(cls, model: Any) -> Reference:
        return cls(copy.deepcopy(model))

    @torch.no_grad()
    def sequence_logps(self, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """``logp_ref(y|x)`` for every row of ``batch`` (keys optionally prefixed)."""
        return forward_logps(self.model, batch, prefix).sums
