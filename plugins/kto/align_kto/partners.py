"""KTO's mismatched pairs, fixed once per split when the data is prepared.

Each example's partner is its own prompt followed by the completion of an example with a
different prompt (never its own prompt's other answer when paired data was split). Prompts are
told apart by the core's ``prompt_id`` (a hash of the record's prompt), not by tokens, which
truncation may have cut differently. Partners are
drawn by rotating a seeded permutation of the split by one and skipping same-prompt examples,
so they do not depend on batch size, shuffling, gradient accumulation or process count: the
reference point z0 of a micro-batch is the same however the run is laid out, and precomputed
reference values stay valid.

Only the partner of each example is held (an array); the mismatched sequence is built when the
example is read, so a split of a million examples costs a few megabytes here.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np

import align


def prompt_length(example: dict[str, Any]) -> int:
    """Tokens before the first trained (completion) token."""
    return next(i for i, m in enumerate(example["completion_mask"]) if m)


def _prompt_keys(examples: align.Examples) -> np.ndarray:
    """Each example's ``prompt_id`` as a 64-bit number (equal ids, equal numbers)."""

    def key(prompt_id: Any) -> int:
        digest = hashlib.blake2b(str(prompt_id).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    return np.fromiter(
        (key(p) for p in examples.value_column("prompt_id")), dtype=np.uint64, count=len(examples)
    )


def add_mismatched_partners(
    examples: align.Examples | list[dict[str, Any]],
    seed: int,
    max_length: int,
    split: str,
    source: str | None = None,
) -> align.Examples:
    """The examples with ``mismatched_input_ids``/``mismatched_completion_mask`` added to each.

    In a seeded permutation of the split, each example's partner is the next example (going
    round) whose ``prompt_id`` differs from its own: linear in the split, on arrays.
    """
    import torch

    if isinstance(examples, list):
        examples = align.ListExamples(examples)
    prompts = _prompt_keys(examples)
    _, counts = np.unique(prompts, return_counts=True)
    if len(counts) < 2:
        raise align.DataError(
            f"KTO needs at least two different prompts in the {split} split: each example's "
            "reference point pairs its prompt with another prompt's completion",
            source=source,
        )
    n = len(examples)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    ring = np.concatenate([order, order])
    ring_prompts = prompts[ring]
    # following[k]: the next ring position whose prompt differs from position k's (the start
    # of the next run of equal prompts); every k < n has one, as two prompts at least occur.
    run_starts = np.flatnonzero(ring_prompts[1:] != ring_prompts[:-1]) + 1
    following = run_starts[np.searchsorted(run_starts, np.arange(n), side="right")]
    partners = np.empty(n, dtype=np.int64)
    partners[order] = ring[following]
    own = examples.prompt_lengths()
    lengths = examples.sequence_lengths() if hasattr(examples, "sequence_lengths") else None
    if lengths is None:
        lengths = np.fromiter((len(e["input_ids"]) for e in examples), np.int64, count=n)
    full = own + lengths[partners] - own[partners]
    cut = int((full > max_length).sum())

    def mismatched(index: int, example: dict[str, Any]) -> dict[str, Any]:
        partner = examples[int(partners[index])]
        mine, theirs = prompt_length(example), prompt_length(partner)
        ids = example["input_ids"][:mine] + partner["input_ids"][theirs:]
        mask = [0] * mine + partner["completion_mask"][theirs:]
        if len(ids) > max_length:
            ids, mask = ids[-max_length:], mask[-max_length:]
        return {"mismatched_input_ids": ids, "mismatched_completion_mask": mask}

    if cut:
        warnings.warn(
            f"KTO ({split}): {cut} mismatched pairs were longer than max_length {max_length} "
            "and lost the start of their prompt",
            stacklevel=2,
        )
    top_count = int(counts.max())
    if top_count > n / 2:
        warnings.warn(
            f"KTO ({split}): {top_count} of {n} examples share one prompt, so their mismatched "
            f"pairs borrow completions from only {n - top_count} other examples and the "
            "reference point z0 rests on few completions",
            stacklevel=2,
        )
    return examples.derive(mismatched, np.minimum(full, max_length))


def warn_if_imbalanced(
    examples: align.Examples | list[dict[str, Any]],
    desirable_weight: float,
    undesirable_weight: float,
) -> None:
    """The KTO paper's advice: keep λ_D·n_D / (λ_U·n_U) within [1, 4/3]."""
    labels = (
        examples.value_column("label")
        if isinstance(examples, align.Examples)
        else (e["label"] for e in examples)
    )
    desirable = sum(bool(label) for label in labels)
    undesirable = len(examples) - desirable
    if desirable and undesirable:
        ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
        if 1 <= ratio <= 4 / 3:
            return
        low = undesirable_weight * undesirable / desirable
        advice = (
            f"λ_D·n_D/(λ_U·n_U) = {ratio:.3g} is outside [1, 4/3]; "
            f"set desirable_weight between {low:.3g} and {4 / 3 * low:.3g}"
        )
    else:
        advice = "only one class is present, so the loss cannot contrast the two"
    warnings.warn(
        f"KTO: {desirable} desirable and {undesirable} undesirable training examples: {advice}",
        stacklevel=2,
    )
