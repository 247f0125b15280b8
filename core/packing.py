"""Padding-free batches for plugins that build their own (``align.data.packing``): ``pack``
lays out groups of sequences, a shared prompt once; ``pack_in_order`` numbers the sequences as
the loss reads them; ``is_packed`` tells the layouts apart."""

from .data.packing import is_packed, pack, pack_in_order, shared_prefix

__all__ = ["is_packed", "pack", "pack_in_order", "shared_prefix"]
