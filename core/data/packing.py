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


def pack(groups: Sequence[Sequence[Scored]], pad_token_id: int, prefix: str = "") -> dict:
    """Pack groups of sequences into a padding-free batch (see the module docstring).

    Sequences are numbered in group order, group 0's first; :func:`pack_in_order` takes each
    sequence's number instead (``[all chosen; all rejected]``, say).
    """
    slots, next_slot = [], 0
    for group in groups:
        slots.append(list(range(next_slot, next_slot + len(group))))
        next_slot += len(group)
    return pack_in_order(groups, slots, pad_token_id, prefix)


def pack_in_order(
    groups: Sequence[Sequence[Scored]],
    slots: Sequence[Sequence[int]],
    pad_token_id: int,
    prefix: str = "",
) -> dict:
    """:func:`pack`, with ``slots[g][i]`` the output index of group ``g``'s sequence ``i``."""
    import torch

    pieces = [_lay_out(group, s) for group, s in zip(groups, slots, strict=True)]
    width = max(len(p.ids) for p in pieces)
    rows: list[list[_Piece]] = []
    used: list[int] = []
    for index in sorted(range(len(pieces)), key=lambda i: -len(pieces[i].ids)):
        piece = pieces[index]
        row = next((r for r, n in enumerate(used) if n + len(piece.ids) <= width), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(piece)
        used[row] += len(piece.ids)
    width = max(used)
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    block = np.full(shape, -1, dtype=np.int64)  # a globally unique id per (group, block)
    parent = np.full(shape, -2, dtype=np.int64)  # the prompt block a branch attends to
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
            parent[r, start:end] = np.where(local > 0, next_block, -2)
            targets[r, start:end] = piece.targets
            trained[r, start:end] = piece.trained
            sequence[r, start:end] = piece.sequence
            real[r, start:end] = True
            next_block += int(local.max()) + 1
            start = end
        pads = width - start
        if pads:  # padding attends causally to itself only: no row of the mask is empty
            block[r, start:] = next_block
            positions[r, start:] = np.arange(pads)
            next_block += 1
    index = np.arange(width)
    causal = index[None, :] <= index[:, None]
    same = block[:, None, :] == block[:, :, None]
    to_prompt = block[:, None, :] == parent[:, :, None]
    attention = causal[None] & (same | to_prompt)
    total = sum(len(s) for s in slots)
    digests = [b""] * total
    for group, group_slots in zip(groups, slots, strict=True):
        for (ids, mask), slot in zip(group, group_slots, strict=True):
            digests[slot] = sequence_digest(ids, mask)
    return {
        f"{prefix}input_ids": torch.from_numpy(input_ids),
        f"{prefix}position_ids": torch.from_numpy(positions),
        f"{prefix}attention_mask": torch.from_numpy(attention).unsqueeze(1),
        f"{prefix}targets": torch.from_numpy(targets),
        f"{prefix}target_mask": torch.from_numpy(trained),
        f"{prefix}target_sequence": torch.from_numpy(sequence),
        f"{prefix}token_mask": torch.from_numpy(real),
        f"{prefix}sequence_digests": torch.frombuffer(
            bytearray(b"".join(digests)), dtype=torch.uint8
        )
        .view(total, 16)
        .clone(),
    }


def is_packed(batch: dict[str, Any], prefix: str = "") -> bool:
    return f"{prefix}targets" in batch


def sequence_digest(input_ids: Any, completion_mask: Any) -> bytes:
    """16 bytes that identify one sequence: its token ids and which of them are scored."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(completion_mask, dtype=np.int8).tobytes())
    return digest.digest()
