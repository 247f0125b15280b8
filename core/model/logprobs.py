"""Per-token and per-sequence log-probabilities of completion tokens.

In a padded batch, positions ``0..L-2`` predict the tokens at ``1..L-1``; positions outside
the completion mask contribute 0. A packed batch (``align.packing``) names each position's
target token and the sequence it belongs to instead, since its rows hold several sequences and
shared prompts; its attention reaches the model in the form the model's attention
implementation takes (:mod:`align.model.attention`: a boolean mask for ``sdpa``, an additive
one for ``eager``, a block mask for ``flex_attention``, sequence boundaries for flash).

``log p(target) = logit[target] − logsumexp(logits)``, in float32, only at positions whose
target is trained. By default from the hidden states (:mod:`align.model.head`): the model's
body runs as usual, and its output head sees only the trained positions, a chunk at a time, so
no full-vocabulary logits exist, forward or backward. A model whose head that module does not
understand gets the full logits and the log-probs from them in float32 chunks
(:func:`target_logps`), as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .attention import packed_attention
from .head import HeadLogps, head_replaced, hidden_target_logps, output_head

CHUNK_ELEMENTS = 1 << 22  # float32 elements of one chunk of logits rows (16 MiB)


class TokenLogps:
    """Per-token log-probs of a batch, in the batch's layout, and how they map to sequences.

    ``logps``, ``mask``, ``targets`` and ``predictions`` (the model's argmax token, −1 where no
    trained token is predicted) have one entry per predicting position (``[B, L-1]`` in a
    padded batch, ``[R, T]`` in a packed one); ``entropy`` and ``mean_logits`` (the mean over
    the vocabulary of the scored logits) too, when asked for (float32, no gradient, 0 where
    untrained). ``logits`` are the model's logits and ``predicting_logits``
    the ones aligned with ``targets``: computed on first use when the log-probs came from the
    hidden states (the full vocabulary at every position, with gradients: avoid them at real
    vocabulary sizes). ``sums`` and ``num_tokens`` have one value per sequence, in the order
    the batch lists its sequences.
    """

    def __init__(
        self,
        logps: torch.Tensor,
        mask: torch.Tensor,
        logits: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        sequence: torch.Tensor | None = None,
        num_sequences: int = 0,
        predictions: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        full_logits: Callable[[], torch.Tensor] | None = None,
        mean_logits: torch.Tensor | None = None,
    ) -> None:
        self.logps, self.mask, self.targets = logps, mask, targets
        self.sequence = sequence  # packed: the sequence of each position
        self.num_sequences = num_sequences
        self.entropy, self.mean_logits = entropy, mean_logits
        self._logits, self._full_logits, self._predictions = logits, full_logits, predictions

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            if self._full_logits is None:
                raise ValueError("these log-probs were made without logits")
            self._logits = self._full_logits()
        return self._logits

    @property
    def predictions(self) -> torch.Tensor:
        if self._predictions is None:
            with torch.no_grad():
                best = self.predicting_logits.argmax(-1)
            self._predictions = best.masked_fill(~self.mask.bool(), -1)
        return self._predictions

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

    def mask_without(self, sequences: torch.Tensor) -> torch.Tensor:
        """``mask`` with every position of the flagged sequences (one bool per sequence, in the
        batch's order) at 0: ``batch["truncated"]`` leaves out the completions that reached
        the length limit without EOS."""
        kept = (~sequences.to(self.mask.device).bool()).to(self.mask.dtype)
        return self.mask * self.per_position(kept)

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


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature in (0, 1, None) else logits / temperature


@torch.no_grad()
def entropy_at(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``H(softmax(logits))`` (float32) where ``mask`` is set, 0 elsewhere, in float32 chunks
    of positions (no full-vocabulary float32 copy of the logits)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    positions = mask.bool().nonzero(as_tuple=True)
    step = max(1, CHUNK_ELEMENTS // logits.shape[-1])
    for start in range(0, positions[0].numel(), step):
        chunk = tuple(p[start : start + step] for p in positions)
        logp = torch.log_softmax(logits[chunk].float(), dim=-1)
        out[chunk] = -(logp.exp() * logp).sum(-1)
    return out


@torch.no_grad()
def mean_logits_at(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over the vocabulary of ``logits`` (float32) where ``mask`` is set, 0 elsewhere,
    in float32 chunks of positions."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    positions = mask.bool().nonzero(as_tuple=True)
    step = max(1, CHUNK_ELEMENTS // logits.shape[-1])
    for start in range(0, positions[0].numel(), step):
        chunk = tuple(p[start : start + step] for p in positions)
        out[chunk] = logits[chunk].float().mean(-1)
    return out


def _model_inputs(batch: dict[str, Any], prefix: str, model: Any, inputs_embeds: Any) -> dict:
    """The keyword arguments of the model's forward for ``batch``, either layout (a packed
    batch's attention in the form the model's attention implementation takes it:
    :func:`align.model.attention.packed_attention`)."""
    tokens = {"input_ids": batch[f"{prefix}input_ids"]}
    if inputs_embeds is not None:
        tokens = {"inputs_embeds": inputs_embeds}
    if f"{prefix}targets" not in batch:
        return {**tokens, "attention_mask": batch[f"{prefix}attention_mask"], "use_cache": False}
    return {**tokens, **packed_attention(batch, prefix, model), "use_cache": False}


def _targets(batch: dict[str, Any], prefix: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per predicting position: the target token, whether it is trained, and whether the
    layout is padded (positions ``0..L-2`` of each row predict ``1..L-1``)."""
    if f"{prefix}targets" in batch:
        return batch[f"{prefix}targets"], batch[f"{prefix}target_mask"].bool(), False
    input_ids, completion = batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"]
    return input_ids[:, 1:], completion[:, 1:].bool(), True


def forward_logps(
    model: Any,
    batch: dict[str, torch.Tensor],
    prefix: str = "",
    temperature: float = 1.0,
    entropy: bool = False,
    inputs_embeds: torch.Tensor | None = None,
    mean_logits: bool = False,
) -> TokenLogps:
    """Run the model on ``batch`` (keys optionally prefixed) and return its token log-probs.

    The log-probs come straight from the hidden states (:mod:`align.model.head`): only the
    positions whose next token is trained go through the output head, a chunk at a time, and
    no full-vocabulary logits are made unless ``.logits`` is read. A model whose head is not
    understood (:func:`align.model.head.why_not_from_hidden`) gets today's full logits instead.

    ``temperature``: the log-probs of ``logits / temperature``, the distribution an on-policy
    objective sampled from (TRL's GRPO scores the policy, the old policy and the reference so:
    pass ``run.config.temperature`` here and to the reference's ``sequence_logps`` or
    ``token_logps``); 0 (greedy) and 1 leave the logits as they are. ``entropy``: also the
    entropy of that distribution at every trained position; ``mean_logits``: also the mean over
    the vocabulary of those logits there (TRL's ``logits/*`` metrics); both are computed from
    the chunks of logits the log-probs are made from, under no gradient. ``inputs_embeds``: the
    model's input embeddings instead of the batch's token ids (IFT's mixed embeddings); the
    targets still come from the batch.

    Works on the padded layout (``input_ids``, ``attention_mask``, ``completion_mask``) and on
    the packed one (``align.packing``: ``position_ids``, the attention as
    :func:`align.model.attention.packed_attention` gives it to the model's attention
    implementation, ``targets``, ``target_mask``, ``target_sequence``).
    """
    inputs = _model_inputs(batch, prefix, model, inputs_embeds)
    targets, trained, padded = _targets(batch, prefix)
    packed = (
        {}
        if padded
        else {
            "sequence": batch[f"{prefix}target_sequence"],
            "num_sequences": int(batch[f"{prefix}sequence_digests"].shape[0]),
        }
    )
    head = output_head(model)
    if isinstance(head, str):
        stats = {"entropy": entropy, "mean_logits": mean_logits}
        return _from_logits(model, inputs, batch, prefix, temperature, stats, packed)
    state: dict[str, Any] = {}

    def compute(hidden: torch.Tensor) -> HeadLogps:
        device = hidden.device.type
        state["hidden"] = hidden
        state["autocast"] = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        predicting = hidden[:, :-1] if padded else hidden
        return hidden_target_logps(
            predicting[trained],
            targets[trained],
            head.module,
            scale=head.scale,
            softcap=head.softcap,
            temperature=temperature,
            entropy=entropy,
            mean_logits=mean_logits,
        )

    with head_replaced(head.module, compute) as results:
        model(**inputs)
    if len(results) != 1:
        raise RuntimeError(
            f"{type(model).__name__}'s forward called its output head {len(results)} times, not "
            "once: its log-probs cannot be computed from the hidden states"
        )
    rows = results[0]

    def full_logits() -> torch.Tensor:
        hidden = state["hidden"]
        enabled, dtype = state["autocast"]
        autocast = torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled)
        with _whole_weights(model, head.module), autocast:
            return head.logits(hidden, temperature)

    where = trained.nonzero(as_tuple=True)
    shape, device = trained.shape, trained.device
    logps = torch.zeros(shape, dtype=torch.float32, device=device).index_put(where, rows.logps)
    predictions = torch.full(shape, -1, dtype=torch.long, device=device)
    predictions[where] = rows.predictions

    def spread(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        return torch.zeros(shape, dtype=torch.float32, device=device).index_put(where, values)

    return TokenLogps(
        logps=logps,
        mask=trained.float(),
        targets=targets,
        predictions=predictions,
        entropy=spread(rows.entropy),
        mean_logits=spread(rows.mean_logits),
        full_logits=full_logits,
        **packed,
    )


def forward_hidden(
    model: Any,
    batch: dict[str, torch.Tensor],
    prefix: str = "",
    compute: Callable[[torch.Tensor, Any], Any] | None = None,
) -> Any:
    """Run the model on ``batch`` (either layout, keys optionally prefixed) and return its
    final hidden states at the positions whose next token is trained: ``[N, H]``, in the order
    of ``forward_logps(...).mask``'s set positions (row by row), with gradients when enabled.
    No logits are computed: the output head's forward is replaced for the call.

    ``compute(rows, head)``: called with those rows and the model's
    :class:`align.model.head.OutputHead` once the model's forward has returned (outside it:
    under FSDP or ZeRO-3 the head's weight would not be whole there), under the autocast the
    forward ran in, and its result returned instead of the rows: a loss that goes through the
    head (on-policy distillation's divergence). Raises
    ``ValueError`` for a model whose head :func:`align.model.head.output_head` does not
    understand (the caller names the model)."""
    head = output_head(model)
    if isinstance(head, str):
        raise ValueError(head)
    inputs = _model_inputs(batch, prefix, model, None)
    _, trained, padded = _targets(batch, prefix)

    autocast: list[tuple[bool, Any]] = []

    def rows(hidden: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        autocast.append((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        predicting = hidden[:, :-1] if padded else hidden
        return predicting[trained]

    with head_replaced(head.module, rows) as results:
        model(**inputs)
    if len(results) != 1:
        raise RuntimeError(
            f"{type(model).__name__}'s forward called its output head {len(results)} times, not "
            "once: its hidden states at the trained positions cannot be read"
        )
    if compute is None:
        return results[0]
    enabled, dtype = autocast[0]
    with torch.autocast(results[0].device.type, dtype=dtype, enabled=enabled):
        return compute(results[0], head)


@contextlib.contextmanager
def _whole_weights(model: Any, head: Any) -> Iterator[None]:
    """Under FSDP2 the head's weight is whole only inside the model's forward: gather it again
    for a lazy read of the logits, through the FSDP unit that holds it (the innermost one
    around the head; the root unit with a decoder-layer wrap policy). That is a collective
    (every process reads them) and carries no gradient back to the shards, so it is refused
    with gradients."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule) and _holds(m, head)]
    if not units:
        yield
        return
    if torch.is_grad_enabled():
        raise RuntimeError(
            "under FSDP the full logits can be read after forward_logps only under "
            "torch.no_grad() (their gradient would not reach the sharded weights)"
        )
    unit = units[-1]  # modules() lists outer units before the ones inside them
    unit.unshard()
    try:
        yield
    finally:
        unit.reshard()


def _holds(unit: Any, module: Any) -> bool:
    return any(m is module for m in unit.modules())


def _from_logits(
    model: Any,
    inputs: dict[str, Any],
    batch: dict[str, Any],
    prefix: str,
    temperature: float,
    stats: dict[str, bool],
    packed: dict[str, Any],
) -> TokenLogps:
    """The full-logits path, for a model whose head :mod:`align.model.head` does not
    understand: the logits, then the target log-probs from them in float32 chunks."""
    logits = _tempered(model(**inputs).logits, temperature)
    if packed:
        targets, trained = batch[f"{prefix}targets"], batch[f"{prefix}target_mask"]
        logps, mask = target_logps(logits, targets, trained), trained.float()
        predicting = logits
    else:
        input_ids = batch[f"{prefix}input_ids"]
        logps, mask = token_logps(logits, input_ids, batch[f"{prefix}completion_mask"])
        targets, predicting = input_ids[:, 1:], logits[:, :-1]
    return TokenLogps(
        logps=logps,
        mask=mask,
        logits=logits,
        targets=targets,
        entropy=entropy_at(predicting, mask) if stats["entropy"] else None,
        mean_logits=mean_logits_at(predicting, mask) if stats["mean_logits"] else None,
        **packed,
    )
