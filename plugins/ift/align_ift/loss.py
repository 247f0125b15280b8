"""The IFT loss (Hua et al. 2024, arXiv 2405.11870), as the official code computes it
(TsinghuaC3I/Intuitive-Fine-Tuning ``src/trainers.py``, loss ``ift``).

1. A no-grad pass on the ground-truth inputs predicts, at each completion position i, the token
   x̂_i from position i−1 (greedy argmax; or, with ``prediction=expected``, the
   probability-weighted embedding).
2. Temporal residual connection: ``e_i = (1−λ)·E[x_i] + λ·E[x̂_i]`` at completion positions,
   ``E[x_i]`` elsewhere. The lookups carry no gradient (the official code uses a frozen copy of
   the table re-synced after each step, which equals a detached lookup of the current weights);
   a tied output layer still learns through the logits.
3. A second pass, with gradients, on the mixed embeddings gives each completion token's NLL
   ``ℓ_t`` against the ground-truth next token.
4. Relation propagation: ``item_t = ℓ_t/T``, ``c_t = Σ_{j≥t} γ^{j−t}·item_j``,
   ``w = c·T/Σc`` (mean weight 1), kept in the graph; γ = 0 gives weights of 1 (the official
   special case, not the formula's limit).
5. ``loss = mean over sequences of Σ_t ℓ_t·w_t / T``.

The paper's double sum, read literally, weights *later* tokens more; the official code (and
this plugin) weights *earlier* tokens more, since c_t accumulates the losses that follow t.
With λ = 0 and γ = 0, IFT is SFT with ``normalization=sequence``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

import align


def discounted_suffix_sums(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """``c_t = Σ_{j≥t} γ^{j−t}·values_j`` along the last dimension (differentiable).

    One T×T discount matrix (upper triangle ``γ^{j−t}``), built with a single temporary.
    """
    length = values.shape[-1]
    index = torch.arange(length, device=values.device, dtype=values.dtype)
    decay = (index.unsqueeze(0) - index.unsqueeze(1)).clamp_(min=0)  # [t, j] = max(j − t, 0)
    decay = torch.pow(gamma, decay).triu_()
    return values @ decay.transpose(0, 1)


def relation_weights(nll: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Relation-propagation weights ``w = c·T/Σc`` over each row's completion tokens."""
    if gamma == 0:
        return torch.ones_like(nll)
    tokens = mask.sum(-1, keepdim=True)
    suffix = discounted_suffix_sums(nll / tokens.clamp(min=1) * mask, gamma) * mask
    return suffix * tokens / suffix.sum(-1, keepdim=True).clamp(min=torch.finfo(nll.dtype).tiny)


def ift_sequence_losses(nll: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``Σ_t ℓ_t·w_t / T`` per sequence, from per-token NLL ``ℓ`` (0 where masked)."""
    weights = relation_weights(nll, mask, gamma)
    return (nll * weights * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class TemporalResidual:
    """What the no-grad first pass predicts at each completion position, and the mixing
    ``(1−λ)·E[x_i] + λ·E[x̂_i]`` it implies for the second pass's input embeddings.

    The mixing runs inside the model's forward, as a hook on the input embedding module: under
    FSDP the table is sharded and only whole inside the forward."""

    def __init__(self, model: Any, batch: dict[str, Any], lam: float, prediction: str) -> None:
        self.lam, self.prediction = lam, prediction
        self.trained = self.predicted = self.probs = None
        self.first_nll: torch.Tensor | None = None
        if lam == 0:
            return
        with torch.no_grad():
            first = align.forward_logps(model, batch)  # the ground-truth inputs
            self.trained = first.mask.bool()  # the positions that predict each mixed position
            if prediction == "greedy":
                self.predicted = first.predictions[self.trained]
            else:  # the full logits (the greedy pass needs none)
                self.probs = torch.softmax(first.predicting_logits[self.trained].float(), dim=-1)
            self.first_nll = -first.logps.sum()

    def mix(self, embeddings: Any, truth: torch.Tensor) -> torch.Tensor:
        """The mixed embeddings from the ground truth's ``truth = E[ids]`` (no gradient)."""
        truth = truth.detach()
        if self.lam == 0:
            return truth
        with torch.no_grad():
            if self.predicted is not None:
                predicted = embeddings(self.predicted)
            else:
                predicted = self.probs.to(embeddings.weight.dtype) @ embeddings.weight
                scale = getattr(embeddings, "embed_scale", None)  # scaled embeddings (Gemma)
                if scale is not None:
                    predicted = predicted * scale
            mixed = truth.clone()
            rest = mixed[:, 1:]
            rest[self.trained] = (1 - self.lam) * rest[self.trained] + self.lam * predicted.to(
                truth.dtype
            )
        return mixed

    @contextlib.contextmanager
    def applied(self, embeddings: Any) -> Iterator[None]:
        """While active, ``embeddings``' output is the mixed embeddings."""
        inside = False

        def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            nonlocal inside
            if inside:  # the lookup of the predicted tokens, from within mix()
                return None
            inside = True
            try:
                mixed = self.mix(module, output)
            finally:
                inside = False
            if torch.is_grad_enabled():  # reentrant gradient checkpointing needs an input with
                mixed.requires_grad_(True)  # a grad (PEFT's hook never sees detached lookups)
            return mixed

        # First among the module's hooks: ZeRO-3 partitions the weight again in one of its own.
        handle = embeddings.register_forward_hook(hook, prepend=True)
        try:
            yield
        finally:
            handle.remove()


def mixed_embeddings(
    model: Any,
    embeddings: Any,
    batch: dict[str, Any],
    lam: float,
    prediction: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The second pass's input embeddings, and the first pass's summed NLL (None when λ = 0).

    Only completion positions are mixed, so the expected embedding is computed for them alone.
    """
    residual = TemporalResidual(model, batch, lam, prediction)
    with torch.no_grad():
        return residual.mix(embeddings, embeddings(batch["input_ids"])), residual.first_nll


def ift_loss(
    model: Any,
    embeddings: Any,
    batch: dict[str, Any],
    lam: float,
    gamma: float,
    prediction: str = "greedy",
) -> align.LossOutput:
    residual = TemporalResidual(model, batch, lam, prediction)
    with residual.applied(embeddings):
        out = align.forward_logps(model, batch)
    first_nll = residual.first_nll
    logps, mask = out.logps, out.mask
    nll = -logps
    losses = ift_sequence_losses(nll, mask, gamma)
    tokens = mask.sum()
    if first_nll is None:  # λ = 0: the inputs were the ground truth
        first_nll = nll.detach().sum()
    return align.LossOutput(
        loss=losses.sum(),
        count=len(losses),
        metrics={
            "nll": (nll.detach().sum(), tokens),
            "sft_nll": (first_nll, tokens),
            "lambda": (lam, 1),
        },
    )
