"""How a packed batch reaches a model's attention: the keyword arguments each implementation takes.

A packed batch (``align.packing``) says, per position, which attention block it belongs to
(``attention_block``: a shared prompt, a branch, or a row's padding) and which shared prompt
block its branch also sees (``attention_prompt_block``, ``NO_PROMPT`` for none). Position ``q``
attends to ``kv`` when ``kv <= q`` and ``block[kv]`` is ``block[q]`` or ``prompt_block[q]``.
Each attention implementation takes that rule in its own form:

- ``sdpa``: the boolean ``[rows, 1, T, T]`` mask itself (the batch's, or built here from the ids
  when the batch was packed without it).
- ``eager``: an additive float mask (eager adds a 4-D mask to its scores, so a boolean one would
  mask nothing): :func:`attention_bias`.
- ``flex_attention``: a ``BlockMask`` from a ``mask_mod`` that reads the two id vectors. It never
  builds a dense ``T × T`` mask on CUDA and skips the blocks no query sees, so rows can be
  filled to a token budget (``pack(..., row_tokens=...)``). transformers hands a 4-D mask,
  ``BlockMask`` included, to the attention unchanged (``masking_utils._preprocess_mask_arguments``
  returns any 4-D mask as it is). FlexAttention's backward runs only on CUDA: CPU keeps ``sdpa``.
- ``flash_attention_*``: no mask at all. Variable-length flash attention takes the sequence
  boundaries (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``), which is enough only for
  plain packing, where every block is a sequence of its own; a shared prompt cannot be
  expressed, and is an error. The boundaries are passed explicitly: transformers infers them
  from ``position_ids`` only for a batch of one row (``_is_packed_sequence`` wants
  ``batch_size == 1``); with several rows it would run causal flash attention over each whole
  row, across the sequences packed in it.

Every implementation also gets the batch's ``position_ids`` (the rotary positions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..data.batching import sequence_prefixes
from ..data.packing import NO_PROMPT
from ..errors import ConfigError
from .head import inner_model

FLEX_BLOCK_SIZE = 128  # FlexAttention's tile: the granularity at which it skips masked blocks
MASKLESS_ROW_TOKENS = 8192  # a packed row's tokens under a kernel that takes no dense mask


def attention_implementation(model: Any) -> str | None:
    """The attention implementation ``model`` runs (``config._attn_implementation``), looking
    through wrappers such as DDP."""
    config = getattr(inner_model(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def is_flash(implementation: str | None) -> bool:
    """Whether ``implementation`` is a flash attention (transformers' own test: "flash" in the
    name, which covers ``flash_attention_2/3/4`` and hub kernels such as
    ``kernels-community/flash-attn``)."""
    return implementation is not None and "flash" in implementation


def packing_options(implementation: str | None) -> dict[str, Any]:
    """``pack``'s ``dense_mask`` and ``row_tokens`` for batches a model with ``implementation``
    attention scores: ``sdpa`` and ``eager`` read the dense mask, whose cost grows with ``T²``,
    so rows stay capped at the widest group; FlexAttention and flash attention read the ids
    alone and skip what no query sees, so rows are filled to ``MASKLESS_ROW_TOKENS`` (less
    padding, fewer rows) and no dense mask is built."""
    if implementation == "flex_attention" or is_flash(implementation):
        return {"dense_mask": False, "row_tokens": MASKLESS_ROW_TOKENS}
    return {"dense_mask": True, "row_tokens": None}


def packed_attention(batch: dict[str, Any], prefix: str, model: Any) -> dict[str, Any]:
    """The ``attention_mask`` and ``position_ids`` (and for flash attention the variable-length
    boundaries) that ``model``'s forward takes for the packed sequences under ``prefix``."""
    implementation = attention_implementation(model)
    positions = {"position_ids": batch[f"{prefix}position_ids"]}
    if implementation == "flex_attention":
        return {"attention_mask": packed_block_mask(*_ids(batch, prefix)), **positions}
    if is_flash(implementation):
        block, prompt_block = _ids(batch, prefix)
        if has_shared_prompt(prompt_block):
            raise ConfigError(
                f"a packed batch with shared prompts cannot run under {implementation} "
                "attention, which knows sequence boundaries only; load the model with "
                "flex_attention (CUDA) or sdpa"
            )
        return {"attention_mask": None, **positions, **varlen_attention_kwargs(block)}
    mask = batch.get(f"{prefix}attention_mask")
    if mask is None:  # packed for a maskless kernel: build it here, on the batch's device
        mask = dense_attention_mask(*_ids(batch, prefix))
    return {"attention_mask": attention_bias(mask, model), **positions}


def _ids(batch: dict[str, Any], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-position ``attention_block`` and ``attention_prompt_block`` of ``prefix``."""
    names = (f"{prefix}attention_block", f"{prefix}attention_prompt_block")
    if any(name not in batch for name in names):
        raise ConfigError(
            f"the packed batch has no {' / '.join(names)}, which attention without a dense "
            "mask needs: build it with align.packing.pack"
        )
    return batch[names[0]], batch[names[1]]


def attention_bias(mask: torch.Tensor, model: Any) -> torch.Tensor:
    """A boolean 4-D attention mask (True: attends) in the form ``model``'s attention takes it.

    ``sdpa`` takes the boolean mask itself (a quarter of a float32 mask's memory). ``eager``
    attention adds a 4-D mask to its scores as it is, so a boolean one would add 0 or 1 and
    mask nothing: it gets the additive mask transformers itself builds, 0 where a position
    attends and the dtype's minimum elsewhere, in the autocast dtype under autocast, else the
    model's (Accelerate's autocast wraps the model's forward, so that is float32 there, which
    eager's score addition promotes to).
    """
    if attention_implementation(model) == "sdpa":
        return mask
    device = mask.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask.bool(), torch.finfo(dtype).min)


def dense_attention_mask(block: torch.Tensor, prompt_block: torch.Tensor) -> torch.Tensor:
    """The boolean ``[rows, 1, T, T]`` mask of the ids (what ``pack(dense_mask=True)`` holds),
    built on their device: for ``sdpa`` or ``eager`` given a batch packed without one."""
    index = torch.arange(block.shape[1], device=block.device)
    causal = index[None, :] <= index[:, None]
    same = block[:, None, :] == block[:, :, None]
    to_prompt = block[:, None, :] == prompt_block[:, :, None]
    return (causal[None] & (same | to_prompt)).unsqueeze(1)


def packed_mask_mod(block: torch.Tensor, prompt_block: torch.Tensor) -> Callable:
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` of the packed layout: True where query
    ``q_idx`` of row ``b`` attends to ``kv_idx`` (any head)."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        kv_block = block[b, kv_idx]
        seen = (kv_block == block[b, q_idx]) | (kv_block == prompt_block[b, q_idx])
        return (kv_idx <= q_idx) & seen

    return mask_mod


def packed_block_mask(
    block: torch.Tensor, prompt_block: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE
) -> Any:
    """The ``BlockMask`` of :func:`packed_mask_mod` for rows ``[rows, T]``, on the ids' device.

    On CUDA its construction is compiled, which evaluates the ``mask_mod`` tile by tile rather
    than over a dense ``[rows, T, T]`` grid; elsewhere it runs eagerly (tests, CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = block.shape
    return create_block_mask(
        packed_mask_mod(block, prompt_block),
        B=rows,
        H=None,
        Q_LEN=width,
        KV_LEN=width,
        device=block.device,
        BLOCK_SIZE=block_size,
        _compile=block.device.type == "cuda",
    )


def has_shared_prompt(prompt_block: torch.Tensor) -> bool:
    """Whether any branch attends to a shared prompt (not plain packing). Reads the device."""
    return bool((prompt_block != NO_PROMPT).any())


def batch_has_shared_prompt(batch: dict[str, Any]) -> bool:
    """Whether any packed sequence of ``batch`` (any prefix) attends to a shared prompt: such
    batches need ``flex_attention`` (or a dense mask), not flash attention."""
    return any(
        has_shared_prompt(batch[f"{prefix}attention_prompt_block"])
        for prefix in sequence_prefixes(batch)
        if f"{prefix}attention_prompt_block" in batch
    )


def varlen_attention_kwargs(block: torch.Tensor) -> dict[str, Any]:
    """Flash attention's variable-length arguments for rows of whole blocks, each one sequence:
    the cumulative boundaries over the flattened rows (int32, as the kernel takes them) and the
    longest block. A row's padding is a block of its own, so it attends to itself only."""
    rows, width = block.shape
    flat = block.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::width] = True  # a block never continues into the next row
    boundaries = torch.cat(
        [starts.nonzero().squeeze(-1), torch.tensor([rows * width], device=block.device)]
    ).to(torch.int32)
    longest = int(boundaries.diff().max())
    return {
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": longest,
        "max_length_k": longest,
    }
