"""Turning tokenised examples into padded tensors (right padding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def sequence_prefixes(keys: Any) -> list[str]:
    """The prefixes of the sequences in an example or batch: ``""`` for ``input_ids``,
    ``"chosen_"`` for ``chosen_input_ids`` and so on, in key order."""
    return [key[: -len("input_ids")] for key in keys if key.endswith("input_ids")]


def pad(sequences: Sequence[Sequence[int]], value: int) -> Any:
    """Right-pad integer sequences into a ``[len(sequences), longest]`` long tensor."""
    import torch

    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def sequence_batch(
    examples: Sequence[dict[str, Any]], pad_token_id: int, prefix: str = ""
) -> dict[str, Any]:
    """``input_ids``, ``attention_mask`` and ``completion_mask`` for one sequence per example.

    ``prefix`` selects other sequences of the example, e.g. ``"chosen_"``.
    """
    ids = [e[f"{prefix}input_ids"] for e in examples]
    return {
        "input_ids": pad(ids, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "completion_mask": pad([e[f"{prefix}completion_mask"] for e in examples], 0),
    }


def paired_batch(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Chosen and rejected concatenated as ``[chosen; rejected]`` rows, for one forward pass.

    Rows ``0..n-1`` are the chosen completions and ``n..2n-1`` the rejected ones.
    """
    rows = [
        {"input_ids": e[f"{side}_input_ids"], "completion_mask": e[f"{side}_completion_mask"]}
        for side in ("chosen", "rejected")
        for e in examples
    ]
    return sequence_batch(rows, pad_token_id)


def packed_sequence_batch(
    examples: Sequence[dict[str, Any]], pad_token_id: int, prefix: str = ""
) -> dict[str, Any]:
    """:func:`sequence_batch`'s sequences, packed without padding (keys not prefixed)."""
    from .packing import pack

    groups = [[(e[f"{prefix}input_ids"], e[f"{prefix}completion_mask"])] for e in examples]
    return pack(groups, pad_token_id)


def every_sequence_batch(
    examples: Sequence[dict[str, Any]], pad_token_id: int, packed: bool = False
) -> dict[str, Any]:
    """Every sequence of the examples batched under its own prefix (``input_ids``, and e.g.
    ``mismatched_input_ids`` that a plugin's ``align_prepare_dataset`` added): the batch of a
    data format that builds none of its own. ``packed``: padding-free (``align.packing``)."""
    batch: dict[str, Any] = {}
    for prefix in sequence_prefixes(examples[0]):
        build = packed_sequence_batch if packed else sequence_batch
        batch.update({f"{prefix}{k}": v for k, v in build(examples, pad_token_id, prefix).items()})
    return batch


def sequence_token_counts(batch: dict[str, Any], prefix: str = "") -> Any:
    """The trained (completion) target tokens of each sequence of a padded or packed batch,
    in the order the batch lists its sequences (``align.forward_logps``'s ``num_tokens``,
    known before the forward): what ``align_loss_counts`` reads for a token mean."""
    import torch

    from .packing import is_packed

    if not is_packed(batch, prefix):
        return batch[f"{prefix}completion_mask"][:, 1:].sum(-1)
    mask = batch[f"{prefix}target_mask"]
    sequences = batch[f"{prefix}target_sequence"][mask]
    total = batch[f"{prefix}sequence_digests"].shape[0]
    counts = torch.zeros(total, dtype=torch.long, device=mask.device)
    return counts.index_add(0, sequences, torch.ones_like(sequences))


def count_tokens(batch: dict[str, Any]) -> Any:
    """The real (non-padding) input positions of a padded or packed batch, all sequences: the
    tokens the model's forward computed, a prompt that a packed batch shares once
    (``num_tokens_computed``)."""
    from .packing import is_packed

    total = 0
    for prefix in sequence_prefixes(batch):
        key = "token_mask" if is_packed(batch, prefix) else "attention_mask"
        total = total + batch[f"{prefix}{key}"].sum()
    return total


def count_sequence_tokens(batch: dict[str, Any]) -> Any:
    """TRL's ``num_tokens`` of a batch: the real tokens of each of its sequences, prompt
    included, a prompt that a packed batch shares counted once per sequence (as in a padded
    batch). Only the main sequences (``input_ids``) when the batch has them: a plugin's extra
    sequences (KTO's mismatched pairs, TRL's KL batch) are not counted, as in TRL."""
    from .packing import is_packed

    prefixes = sequence_prefixes(batch)
    total = 0
    for prefix in [""] if "" in prefixes else prefixes:
        if is_packed(batch, prefix):
            total = total + _packed_sequence_tokens(batch, prefix)
        else:
            total = total + batch[f"{prefix}attention_mask"].sum()
    return total


def _packed_sequence_tokens(batch: dict[str, Any], prefix: str) -> Any:
    """The tokens of a packed batch's sequences, each in full. A group with a shared prompt
    of ``p`` positions has one branch per sequence, whose positions continue from ``p``: each
    branch adds ``p`` (its first position id), and the prompt's own ``p`` positions are then
    counted by their branches instead. No host synchronisation (no indexing by a mask)."""
    import torch

    from .packing import NO_PROMPT

    real = batch[f"{prefix}token_mask"].flatten().bool()
    block = batch[f"{prefix}attention_block"].flatten()
    prompt = batch[f"{prefix}attention_prompt_block"].flatten()
    positions = batch[f"{prefix}position_ids"].flatten()
    branch = real & (prompt != NO_PROMPT)
    size = block.numel() + 1  # block ids are below the number of positions; the last: none
    never = torch.iinfo(positions.dtype).max
    first = torch.full((size,), never, dtype=positions.dtype, device=positions.device)
    first = first.scatter_reduce(0, block, torch.where(branch, positions, never), "amin")
    shared = torch.where(first < never, first, 0).sum()
    is_prompt = torch.zeros(size, dtype=torch.bool, device=block.device)
    is_prompt = is_prompt.scatter(0, torch.where(branch, prompt, size - 1), True)
    is_prompt[-1] = False
    prompt_positions = (is_prompt[block] & real).sum()
    return real.sum() + shared - prompt_positions


def is_packed_batch(batch: dict[str, Any]) -> bool:
    """Whether any sequence of a batch is in the padding-free layout."""
    from .packing import is_packed

    return any(is_packed(batch, prefix) for prefix in sequence_prefixes(batch))
