"""Padding-free batches: sequences packed into rows, a shared prompt computed once.

A *group* is the sequences of one example that the loss scores together: a preference pair's
chosen and rejected sequences, or a single sequence. The tokens a group's sequences share at
the start (their prompt) are placed once, followed by one branch per sequence::

    [ shared prompt | chosen branch | rejected branch ]

Each branch starts with a copy of the prompt's last token (which predicts the branch's first
token), its positions continue from the prompt's, and it attends causally to the prompt and to
itself, never to another branch. Groups are then packed first-fit into rows no wider than the
widest group, so a row never costs more attention than a padded row would; no token attends
across groups. Every log-prob equals the one the sequence gets on its own, in its own row.

The batch (keys optionally prefixed) holds ``input_ids``, ``position_ids``, a boolean 4-D
``attention_mask`` ``[rows, 1, T, T]`` (True: attends; ``align.forward_logps`` hands it to
``sdpa`` as it is and to ``eager`` attention as an additive float mask, 0 or the dtype's
minimum, since eager adds a 4-D mask to its scores), and per position the token it predicts
(``targets``),
whether that prediction is trained (``target_mask``) and the sequence it belongs to
(``target_sequence``); ``token_mask`` marks the real (non-padding)
tokens; ``sequence_digests`` identifies every sequence (for the precomputed reference) in the
order the loss reads them. ``align.forward_logps`` reads it.

The mask is made from two ids per position, which the batch carries too, so that a kernel that
never builds a dense ``T × T`` mask (FlexAttention's block mask, flash attention's variable
lengths: ``align.model.attention``) can apply the same rule: ``attention_block``, the block a
position belongs to (a shared prompt, a branch, or a row's padding; unique in the batch), and
``attention_prompt_block``, the shared prompt block that a branch's positions also attend to
(``NO_PROMPT`` when there is none). Position ``q`` attends to ``kv`` when ``kv <= q`` and
``block[kv]`` is ``block[q]`` or ``prompt_block[q]``. ``dense_mask=False`` leaves the dense mask
out (for those kernels it is only memory), and ``row_tokens`` fills rows up to a token budget
rather than to the widest group: a row's cost then no longer grows with ``T²``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Scored = tuple[Sequence[int], Sequence[int]]  # input_ids, completion_mask


@dataclass
class _Piece:
    """One group laid out on its own: token ids, positions, block ids, targets."""

    ids: list[int]
    positions: list[int]
    blocks: list[int]  # 0: the shared prompt; 1, 2, …: a branch (one per sequence)
    targets: list[int]
    trained: list[int]
    sequence: list[int]  # the output slot of each position's prediction (0 when untrained)


def shared_prefix(sequences: Sequence[Scored]) -> int:
    """How many leading tokens the sequences can share: their common prefix, up to each one's
    first trained target (so no trained prediction is made inside the shared part)."""
    first = sequences[0][0]
    shared = min(len(ids) for ids, _ in sequences)
    for ids, mask in sequences:
        common = 0
        while common < shared and ids[common] == first[common]:
            common += 1
        trained = next((t for t, m in enumerate(mask) if m), len(ids))
        shared = min(shared, common, trained)
    return shared


def _lay_out(group: Sequence[Scored], slots: Sequence[int]) -> _Piece:
    shared = shared_prefix(group) if len(group) > 1 else 0
    prompt = max(shared - 1, 0)  # the last shared token is copied into every branch
    ids = group[0][0]
    piece = _Piece(
        ids=list(ids[:prompt]),
        positions=list(range(prompt)),
        blocks=[0] * prompt,
        targets=list(ids[1 : prompt + 1]),
        trained=[0] * prompt,
        sequence=[0] * prompt,
    )
    for branch, ((ids, mask), slot) in enumerate(zip(group, slots, strict=True), start=1):
        length = len(ids) - prompt
        piece.ids += ids[prompt:]
        piece.positions += range(prompt, len(ids))
        piece.blocks += [branch] * length
        piece.targets += [*ids[prompt + 1 :], 0]
        piece.trained += [*(1 if m else 0 for m in mask[prompt + 1 :]), 0]
        piece.sequence += [slot] * length
    return piece


NO_PROMPT = -1  # attention_prompt_block of a position whose branch shares no prompt
_DEFAULT_LAYOUT: dict[str, Any] = {"dense_mask": True, "row_tokens": None}


def set_default_layout(dense_mask: bool = True, row_tokens: int | None = None) -> None:
    """The layout :func:`pack` gives when its caller names none. A run sets it once, from the
    attention its models run (``align.model.attention.packing_options``), so the core's batches
    and those plugins pack alike suit the kernel: no dense mask and rows filled to
    ``row_tokens`` for FlexAttention and flash attention, the dense mask and capped rows (the
    default) for ``sdpa`` and ``eager``."""
    _DEFAULT_LAYOUT.update(dense_mask=dense_mask, row_tokens=row_tokens)


def pack(
    groups: Sequence[Sequence[Scored]],
    pad_token_id: int,
    prefix: str = "",
    *,
    dense_mask: bool | None = None,
    row_tokens: int | None = None,
) -> dict:
    """Pack groups of sequences into a padding-free batch (see the module docstring).

    Sequences are numbered in group order, group 0's first; :func:`pack_in_order` takes each
    sequence's number instead (``[all chosen; all rejected]``, say). ``dense_mask``: include the
    ``[rows, 1, T, T]`` boolean ``attention_mask`` (``sdpa`` and ``eager`` read it; a block-mask
    or variable-length kernel reads the per-position ids alone). ``row_tokens``: fill each row
    first-fit up to this many tokens (a group wider than that gets a row of its own); 0 caps
    rows at the widest group, so a row never costs more dense attention than a padded row.
    Either left None takes the process's layout (:func:`set_default_layout`): a dense mask and
    capped rows, unless the run chose a kernel that reads the ids alone.
    """
    slots, next_slot = [], 0
    for group in groups:
        slots.append(list(range(next_slot, next_slot + len(group))))
        next_slot += len(group)
    return pack_in_order(
        groups, slots, pad_token_id, prefix, dense_mask=dense_mask, row_tokens=row_tokens
    )


def pack_in_order(
    groups: Sequence[Sequence[Scored]],
    slots: Sequence[Sequence[int]],
    pad_token_id: int,
    prefix: str = "",
    *,
    dense_mask: bool | None = None,
    row_tokens: int | None = None,
) -> dict:
    """:func:`pack`, with ``slots[g][i]`` the output index of group ``g``'s sequence ``i``."""
    import torch

    dense_mask = _DEFAULT_LAYOUT["dense_mask"] if dense_mask is None else dense_mask
    row_tokens = _DEFAULT_LAYOUT["row_tokens"] if row_tokens is None else row_tokens or None
    pieces = [_lay_out(group, s) for group, s in zip(groups, slots, strict=True)]
    layout = _fill_rows(_first_fit(pieces, row_tokens), pad_token_id)
    total = sum(len(s) for s in slots)
    digests = [b""] * total
    for group, group_slots in zip(groups, slots, strict=True):
        for (ids, mask), slot in zip(group, group_slots, strict=True):
            digests[slot] = sequence_digest(ids, mask)
    batch = {f"{prefix}{name}": torch.from_numpy(values) for name, values in layout.items()}
    if dense_mask:
        attention = dense_attention(layout["attention_block"], layout["attention_prompt_block"])
        batch[f"{prefix}attention_mask"] = torch.from_numpy(attention).unsqueeze(1)
    batch[f"{prefix}sequence_digests"] = (
        torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).view(total, 16).clone()
    )
    return batch


def _first_fit(pieces: list[_Piece], row_tokens: int | None) -> list[list[_Piece]]:
    """The pieces in rows, longest first, each into the first row with room: a row holds up to
    ``row_tokens`` tokens, or (None) as many as the widest piece."""
    widest = max(len(p.ids) for p in pieces)
    capacity = widest if row_tokens is None else max(widest, row_tokens)
    rows: list[list[_Piece]] = []
    used: list[int] = []
    for piece in sorted(pieces, key=lambda p: -len(p.ids)):
        row = next((r for r, n in enumerate(used) if n + len(piece.ids) <= capacity), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(piece)
        used[row] += len(piece.ids)
    return rows


def _fill_rows(rows: list[list[_Piece]], pad_token_id: int) -> dict[str, np.ndarray]:
    """The ``[rows, T]`` arrays of the batch, ``T`` the fullest row's tokens."""
    shape = (len(rows), max(sum(len(p.ids) for p in row) for row in rows))
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    block = np.zeros(shape, dtype=np.int64)  # a unique id per (group, block), and per padding
    prompt_block = np.full(shape, NO_PROMPT, dtype=np.int64)
    targets = np.zeros(shape, dtype=np.int64)
    trained = np.zeros(shape, dtype=bool)
    real = np.zeros(shape, dtype=bool)
    sequence = np.zeros(shape, dtype=np.int64)
    next_block = 0
    for r, row in enumerate(rows):
        start = 0
        for piece in row:
            end = start + len(piece.ids)
            local = np.asarray(piece.blocks)
            input_ids[r, start:end] = piece.ids
            positions[r, start:end] = piece.positions
            block[r, start:end] = next_block + local
            if local.min() == 0:  # the piece has a shared prompt: its branches attend to it
                prompt_block[r, start:end] = np.where(local > 0, next_block, NO_PROMPT)
            targets[r, start:end] = piece.targets
            trained[r, start:end] = piece.trained
            sequence[r, start:end] = piece.sequence
            real[r, start:end] = True
            next_block += int(local.max()) + 1
            start = end
        pads = shape[1] - start
        if pads:  # padding attends causally to itself only: no row of the mask is empty
            block[r, start:] = next_block
            positions[r, start:] = np.arange(pads)
            next_block += 1
    return {
        "input_ids": input_ids,
        "position_ids": positions,
        "attention_block": block,
        "attention_prompt_block": prompt_block,
        "targets": targets,
        "target_mask": trained,
        "target_sequence": sequence,
        "token_mask": real,
    }


def dense_attention(block: np.ndarray, prompt_block: np.ndarray) -> np.ndarray:
    """The ``[rows, T, T]`` boolean mask of the per-position ids (True: ``q`` attends to
    ``kv``): causal, and within the query's block or into its branch's shared prompt."""
    index = np.arange(block.shape[1])
    causal = index[None, :] <= index[:, None]
    same = block[:, None, :] == block[:, :, None]
    to_prompt = block[:, None, :] == prompt_block[:, :, None]
    return causal[None] & (same | to_prompt)


def is_packed(batch: dict[str, Any], prefix: str = "") -> bool:
    return f"{prefix}targets" in batch


def sequence_digest(input_ids: Any, completion_mask: Any) -> bytes:
    """16 bytes that identify one sequence: its token ids and which of them are scored."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(completion_mask, dtype=np.int8).tobytes())
    return digest.digest()
