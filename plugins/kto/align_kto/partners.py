"""KTO's mismatched pairs, fixed once per split when the data is prepared.

Each example's partner is its own prompt followed by the completion of an example with a
different prompt (never its own prompt's other answer when paired data was split). Partners are
drawn by rotating a seeded permutation of the split by one and skipping same-prompt examples,
so they do not depend on batch size, shuffling, gradient accumulation or process count: the
reference point z0 of a micro-batch is the same however the run is laid out, and precomputed
reference values stay valid.
"""

from __future__ import annotations

import warnings
from typing import Any

import align


def prompt_length(example: dict[str, Any]) -> int:
    """Tokens before the first trained (completion) token."""
    return next(i for i, m in enumerate(example["completion_mask"]) if m)


def add_mismatched_partners(
    examples: list[dict[str, Any]], seed: int, max_length: int, split: str
) -> list[dict[str, Any]]:
    """Add ``mismatched_input_ids``/``mismatched_completion_mask`` to every example."""
    import torch

    prompts = [tuple(e["input_ids"][: prompt_length(e)]) for e in examples]
    if len(set(prompts)) < 2:
        raise align.DataError(
            f"KTO needs at least two different prompts in the {split} split: each example's "
            "reference point pairs its prompt with another prompt's completion"
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = 0
    for k, i in enumerate(order):
        j = next(
            order[(k + step) % len(order)]
            for step in range(1, len(order))
            if prompts[order[(k + step) % len(order)]] != prompts[i]
        )
        start = prompt_length(examples[j])
        ids = list(prompts[i]) + list(examples[j]["input_ids"][start:])
        mask = [0] * len(prompts[i]) + list(examples[j]["completion_mask"][start:])
        if len(ids) > max_length:
            ids, mask, cut = ids[-max_length:], mask[-max_length:], cut + 1
        examples[i]["mismatched_input_ids"], examples[i]["mismatched_completion_mask"] = ids, mask
    if cut:
        warnings.warn(
            f"KTO ({split}): {cut} mismatched pairs were longer than max_length {max_length} "
            "and lost the start of their prompt",
            stacklevel=2,
        )
    return examples


def warn_if_imbalanced(
    examples: list[dict[str, Any]], desirable_weight: float, undesirable_weight: float
) -> None:
    """The KTO paper's advice: keep λ_D·n_D / (λ_U·n_U) within [1, 4/3]."""
    desirable = sum(bool(e["label"]) for e in examples)
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
