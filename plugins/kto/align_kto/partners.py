"""KTO's mismatched pairs, fixed once per split when the data is prepared.

Each example's partner is its own prompt followed by the completion of an example with a
different prompt (never its own prompt's other answer when paired data was split). Prompts are
told apart by the core's ``prompt_id`` (a hash of the record's prompt), not by tokens, which
truncation may have cut differently. Partners are
drawn by rotating a seeded permutation of the split by one and skipping same-prompt examples,
so they do not depend on batch size, shuffling, gradient accumulation or process count: the
reference point z0 of a micro-batch is the same however the run is laid out, and precomputed
reference values stay valid.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import align


def prompt_length(example: dict[str, Any]) -> int:
    """Tokens before the first trained (completion) token."""
    return next(i for i, m in enumerate(example["completion_mask"]) if m)


def add_mismatched_partners(
    examples: list[dict[str, Any]],
    seed: int,
    max_length: int,
    split: str,
    source: str | None = None,
) -> list[dict[str, Any]]:
    """Add ``mismatched_input_ids``/``mismatched_completion_mask`` to every example.

    In a seeded permutation of the split, each example's partner is the next example (going
    round) whose ``prompt_id`` differs from its own: one backward pass, so linear in the split.
    """
    import torch

    prompts = [e["prompt_id"] for e in examples]
    counts = Counter(prompts)
    if len(counts) < 2:
        raise align.DataError(
            f"KTO needs at least two different prompts in the {split} split: each example's "
            "reference point pairs its prompt with another prompt's completion",
            source=source,
        )
    n = len(examples)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    ring = order + order
    following = [0] * (2 * n)  # following[k]: the next ring position with another prompt
    for k in range(2 * n - 2, -1, -1):
        same = prompts[ring[k + 1]] == prompts[ring[k]]
        following[k] = following[k + 1] if same else k + 1
    cut = 0
    for k, i in enumerate(order):
        j = ring[following[k]]
        own, theirs = prompt_length(examples[i]), prompt_length(examples[j])
        ids = examples[i]["input_ids"][:own] + examples[j]["input_ids"][theirs:]
        mask = [0] * own + examples[j]["completion_mask"][theirs:]
        if len(ids) > max_length:
            ids, mask, cut = ids[-max_length:], mask[-max_length:], cut + 1
        examples[i]["mismatched_input_ids"], examples[i]["mismatched_completion_mask"] = ids, mask
    if cut:
        warnings.warn(
            f"KTO ({split}): {cut} mismatched pairs were longer than max_length {max_length} "
            "and lost the start of their prompt",
            stacklevel=2,
        )
    top_count = counts.most_common(1)[0][1]
    if top_count > n / 2:
        warnings.warn(
            f"KTO ({split}): {top_count} of {n} examples share one prompt, so their mismatched "
            f"pairs borrow completions from only {n - top_count} other examples and the "
            "reference point z0 rests on few completions",
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
