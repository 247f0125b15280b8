"""One optimizer step's gradient: every micro-batch's loss, each term normalised by its total
over the step, scaled before its backward.

A loss has one or more terms, each a ``(sum, count)`` in its own unit (tokens, sequences,
pairs). The counts are data: ``align_loss_counts`` gives them for every micro-batch before any
forward. They are totalled over the step's micro-batches and reduced over processes once; then
each micro-batch backwards ``P · Σ_terms sum_t / total_t`` (P processes, whose gradients DDP and
FSDP average), so the accumulated gradient is that of ``Σ_terms Σsum_t / Σcount_t`` over one
large batch, whichever engine runs the backward. After the last backward, the counts the loss
returned are checked against those given up front.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..data.batching import count_sequence_tokens, count_tokens
from ..errors import PluginError
from ..plugins.api import LossOutput
from . import zero
from .metrics import MetricSums

LossFn = Callable[[dict[str, Any]], tuple[LossOutput, dict[str, tuple[Any, Any]]]]
Counted = tuple[dict[str, Any], Mapping[str, Any]]  # a micro-batch and its terms' counts


def _total(value: Any) -> torch.Tensor:
    return torch.as_tensor(value).detach().to(torch.float64).sum().cpu()


def step_totals(
    micro_batches: Sequence[Counted], accelerator: Any, allow_empty: bool = False
) -> tuple[list[str], torch.Tensor]:
    """The terms and each one's count over the step's micro-batches and every process.
    ``allow_empty``: a step may have no units at all (an on-policy round whose completions
    were all masked), and then trains on nothing."""
    names = sorted(micro_batches[0][1])
    for _, counts in micro_batches:
        if sorted(counts) != names:
            raise PluginError(
                f"align_loss_counts gave terms {sorted(counts)} for one micro-batch and {names} "
                "for another: every micro-batch needs the same terms"
            )
    local = torch.stack(
        [sum((_total(counts[n]) for _, counts in micro_batches), torch.zeros(())) for n in names]
    ).to(torch.float64)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
    if not allow_empty and not (local > 0).any():
        raise PluginError("the objective's loss counts are 0 for every term of a whole step")
    return names, local


def accumulate_gradients(
    model: Any,
    micro_batches: Sequence[Counted],
    compute: LossFn,
    accelerator: Any,
    sums: MetricSums,
    losses: list[torch.Tensor] | None = None,
    allow_empty: bool = False,
    count_read_tokens: bool = True,
) -> float:
    """Backward every micro-batch, its loss scaled so the accumulated gradient is that of one
    large batch, and return that batch's loss. ``losses``, when given, receives each micro-batch's
    scaled loss. Nothing is copied off the device between the first and the last backward.

    Token counts: ``num_tokens_computed``, the positions the forwards ran; ``num_tokens``
    (unless ``count_read_tokens`` is False: an on-policy round counts its own once), TRL's,
    each sequence's tokens in full."""
    names, totals = step_totals(micro_batches, accelerator, allow_empty)
    deepspeed = zero.is_deepspeed(accelerator)
    scale = {
        n: accelerator.num_processes / t if t else 0.0  # a term no micro-batch has: nothing
        for n, t in zip(names, totals.tolist(), strict=True)
    }
    term_sums: Any = 0.0
    returned: Any = 0.0
    for i, (batch, _counts) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            output, extra = compute(batch)
            terms = output.all_terms()
            if sorted(terms) != names:
                raise PluginError(
                    f"align_compute_loss returned the terms {sorted(terms)}, but "
                    f"align_loss_counts counted {names}"
                    + (" (not implemented: one term, 'loss')" if names == ["loss"] else "")
                )
            loss = sum(terms[n][0] * scale[n] for n in names)
            if deepspeed:
                zero.backward(model, loss, last)
            else:
                accelerator.backward(loss)
        if losses is not None:
            losses.append(loss.detach())
        device = loss.device
        term_sums = term_sums + torch.stack(
            [torch.as_tensor(terms[n][0]).detach().double().sum().to(device) for n in names]
        )
        returned = returned + torch.stack(
            [torch.as_tensor(terms[n][1], device=device).detach().double().sum() for n in names]
        )
        sums.add_output(output, extra)
        sums.add("num_tokens_computed", count_tokens(batch), 1)
        if count_read_tokens:
            sums.add("num_tokens", count_sequence_tokens(batch), 1)
    after = torch.cat([term_sums, returned])
    if accelerator.num_processes > 1:
        after = accelerator.reduce(after.to(accelerator.device), reduction="sum")
    after = after.cpu()
    term_totals, returned_totals = after[: len(names)], after[len(names) :]
    checks = zip(
        names, totals.tolist(), returned_totals.tolist(), term_totals.tolist(), strict=True
    )
    for name, declared, got, total in checks:
        if not declared and total:
            raise PluginError(
                f"term {name!r} has a loss of {total:g} but a count of 0 units in this step: "
                "a term with no units must add nothing to the loss"
            )
        if not math.isclose(declared, got, rel_tol=1e-6, abs_tol=1e-6):
            raise PluginError(
                f"term {name!r}: align_compute_loss counted {got:g} units in this step, but "
                f"align_loss_counts gave {declared:g} before the forward; the loss was scaled by "
                "the latter. Make the two agree (align_loss_counts not implemented: the count is "
                "the number of examples)"
            )
    pairs = zip(term_totals.tolist(), totals.tolist(), strict=True)
    return sum(s / t for s, t in pairs if t)


def micro_batch_groups(loader: Any, grad_accum: int, start: int = 0) -> Iterator[list]:
    """Endless groups of ``grad_accum`` ``(indices, micro-batch)`` pairs, one per optimizer
    step, from step ``start`` on; an epoch's last group may be shorter."""
    steps_per_epoch = math.ceil(len(loader) / grad_accum)
    epoch, skip = divmod(start, steps_per_epoch)
    while True:
        loader.set_epoch(epoch)
        group: list = []
        for item in loader.batches(skip * grad_accum):
            group.append(item)
            if len(group) == grad_accum:
                yield group
                group = []
        if group:
            yield group
        epoch, skip = epoch + 1, 0
