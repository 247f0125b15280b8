"""Per-token and per-sequence log-probabilities of completion tokens.

In a padded batch, logits at positions ``0..L-2`` predict the tokens at ``1..L-1``; positions
outside the completion mask contribute 0. A packed batch (``align.packing``) names each
position's target token and the sequence it belongs to instead, since its rows hold several
sequences and shared prompts; its boolean 4-D mask reaches ``sdpa`` attention as it is and
``eager`` attention as an additive float mask (:func:`attention_bias`).

``log p(target) = logit[target] − logsumexp(logits)`` is computed in float32 in chunks of
positions, and only at positions whose target is trained: no full-vocabulary float32
log-softmax is ever materialised, forward or backward (for a 32k vocabulary that copy, and the
temporaries of its backward, are several times the logits themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CHUNK_ELEMENTS = 1 << 22  # float32 elements of one chunk of logits rows (16 MiB)


@dataclass
class TokenLogps:
    """Per-token log-probs of a batch, in the batch's layout, and how they map to sequences.

    ``logps``, ``mask`` and ``targets`` have one entry per predicting position (``[B, L-1]``
    in a padded batch, ``[R, T]`` in a packed one); ``logits`` are the model's logits, and
    ``predicting_logits`` the ones aligned with ``targets``. ``sums`` and ``num_tokens`` have one
    value per sequence, in the order the batch lists its sequences.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    sequence: torch.Tensor | None = None  # packed: the sequence of each position
    num_sequences: int = 0

    @property
    def predicting_logits(self) -> torch.Tensor:
        return self.logits if self.sequence is not None else self.logits[:, :-1]

    def per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position ``values`` (the layout of ``logps``, 0 where untrained) summed per
        sequence: one value per sequence, in the batch's order."""
        if self.sequence is None:
            return values.sum(-1)
        out = values.new_zeros(self.num_sequences)
        return out.index_add(0, self.sequence.flatten(), values.flatten())

    def per_position(self, values: torch.Tensor) -> torch.Tensor:
        """One value per sequence spread over the positions of ``logps`` (each position gets
        its sequence's value; positions that predict no trained token get an arbitrary one, so
        multiply by ``mask``)."""
        if self.sequence is None:
            return values.unsqueeze(-1).expand(self.logps.shape)
        return values[self.sequence]

    @property
    def sums(self) -> torch.Tensor:
        """``logp(y|x)``: the sum over completion tokens, one value per sequence."""
        return self.per_sequence(self.logps)

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.per_sequence(self.mask)


class _TargetLogProbs(torch.autograd.Function):
    """``logit[target] − logsumexp(logit)`` at the masked positions, in float32 chunks.

    Forward and backward each hold one chunk of float32 rows at a time; the backward writes
    ``onehot(target) − softmax`` times the incoming gradient into the logits' gradient row by
    row. Saved for backward: the logits (which the caller holds anyway) and one float per
    position.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        flat_targets = targets.reshape(-1)
        rows = mask.reshape(-1).nonzero().squeeze(-1)
        out = torch.zeros(flat.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.zeros(rows.shape[0], dtype=torch.float32, device=logits.device)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step]
            x = flat[chunk].float()
            lse[start : start + step] = torch.logsumexp(x, dim=-1)
            picked = x.gather(-1, flat_targets[chunk].unsqueeze(-1)).squeeze(-1)
            out[chunk] = picked - lse[start : start + step]
        ctx.save_for_backward(logits, flat_targets, rows, lse)
        return out.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, flat_targets, rows, lse = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        grad = torch.zeros_like(flat)
        grad_rows = grad_out.reshape(-1)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step]
            g = grad_rows[chunk].float().unsqueeze(-1)
            part = torch.exp(flat[chunk].float() - lse[start : start + step].unsqueeze(-1))
            part.mul_(-g)
            part.scatter_add_(-1, flat_targets[chunk].unsqueeze(-1), g)
            grad[chunk] = part.to(grad.dtype)
        return grad.view(logits.shape), None, None


def target_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log p(targets)`` (float32) where ``mask`` is set, 0 elsewhere; ``logits`` has one more
    (vocabulary) dimension than ``targets`` and ``mask``."""
    return _TargetLogProbs.apply(logits, targets, mask.bool())


def token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted target log-probs ``[B, L-1]`` (float32, 0 where masked) and the shifted mask."""
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    shifted = torch.zeros_like(completion_mask)
    shifted[:, :-1] = completion_mask[:, 1:]
    logps = target_logps(logits, targets, shifted)[:, :-1]
    return logps, shifted[:, :-1].float()


def _attention_implementation(model: Any) -> str | None:
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP and the like
        model = model.module
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def attention_bias(mask: torch.Tensor, model: Any) -> torch.Tensor:
    """A boolean 4-D attention mask (True: attends) in the form ``model``'s attention takes it.

    ``sdpa`` takes the boolean mask itself (a quarter of a float32 mask's memory). ``eager``
    attention adds a 4-D mask to its scores as it is, so a boolean one would add 0 or 1 and
    mask nothing: it gets the additive mask transformers itself builds, 0 where a position
    attends and the dtype's minimum elsewhere, in the autocast dtype under autocast, else the
    model's (Accelerate's autocast wraps the model's forward, so that is float32 there, which
    eager's score addition promotes to).
    """
    if _attention_implementation(model) == "sdpa":
        return mask
    device = mask.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask.bool(), torch.finfo(dtype).min)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature in (0, 1, None) else logits / temperature


def forward_logps(
    model: Any, batch: dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0
) -> TokenLogps:
    """Run the model on ``batch`` (keys optionally prefixed) and return its token log-probs.

    ``temperature``: the log-probs of ``logits / temperature``, the distribution an on-policy
    objective sampled from (TRL's GRPO and online DPO score completions so); 0 (greedy) and 1
    leave the logits as they are.

    Works on the padded layout (``input_ids``, ``attention_mask``, ``completion_mask``) and on
    the packed one (``align.packing``: ``position_ids``, a boolean 4-D ``attention_mask``
    handed to the model as :func:`attention_bias` gives it, ``targets``, ``target_mask``,
    ``target_sequence``).
    """
    input_ids = batch[f"{prefix}input_ids"]
    if f"{prefix}targets" not in batch:
        logits = model(
            input_ids=input_ids, attention_mask=batch[f"{prefix}attention_mask"], use_cache=False
        ).logits
        logits = _tempered(logits, temperature)
        logps, mask = token_logps(logits, input_ids, batch[f"{prefix}completion_mask"])
        return TokenLogps(logps=logps, mask=mask, logits=logits, targets=input_ids[:, 1:])
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_bias(batch[f"{prefix}attention_mask"], model),
        position_ids=batch[f"{prefix}position_ids"],
        use_cache=False,
    ).logits
    logits = _tempered(logits, temperature)
    targets, mask = batch[f"{prefix}targets"], batch[f"{prefix}target_mask"]
    return TokenLogps(
        logps=target_logps(logits, targets, mask),
        mask=mask.float(),
        logits=logits,
        targets=targets,
        sequence=batch[f"{prefix}target_sequence"],
        num_sequences=int(batch[f"{prefix}sequence_digests"].shape[0]),
    )
