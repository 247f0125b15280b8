"""Data shapes: what a format's groups look like and how they are batched, so that any format
feeds any objective of its shape.

A format declares the shape of the groups it yields (``DataFormat(shape=…)``); an objective
declares the shapes it trains on (``Objective(shapes=…)``). The core checks every group against
its shape and builds the shape's batch, whichever format yielded the group:

=================  ===================================================  ==========================
shape              a group                                              the batch
=================  ===================================================  ==========================
conversation       no prompt; one answer ``""``: a conversation         one sequence per example
                   (messages, trained on the assistant turns)
prompt_completion  one answer ``""`` after a prompt (a string or        one sequence per example
                   messages), or a whole text (no prompt)
preference         a prompt, answers ``chosen_`` and ``rejected_``      ``[chosen; rejected]``
feedback           a prompt, one answer ``""``, values ``label`` (bool)  one sequence, ``labels``
                   and ``prompt_id``
prompt_only        a prompt, no answers, value ``prompt``               the prompts
ranked             a prompt, answers ``completion0_``, … (N ≥ 2),        every answer a row,
                   value ``scores`` (one float per answer)              ``scores``, ``group``
=================  ===================================================  ==========================

A plugin may give a format a shape of its own (a name not above): its objectives name that
shape, and the format's ``batch`` builds its batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .batching import every_sequence_batch, paired_batch, sequence_batch


@dataclass(frozen=True)
class Shape:
    """One of the core's data shapes: what its groups hold (``check``) and its batch."""

    name: str
    description: str
    check: Callable[[Any], str | None]
    batch: Callable[[list[dict[str, Any]], int, bool], dict[str, Any]]


# -- group checks: None, or why a group is not of the shape ----------------------------------------
def _answers(group: Any, expected: Sequence[str]) -> str | None:
    if list(group.answers) != list(expected):
        given = ", ".join(repr(k) for k in group.answers) or "none"
        return f"answers {given}; the shape has {', '.join(repr(k) for k in expected) or 'none'}"
    return None


def _prompted(group: Any) -> str | None:
    if group.prompt is None:
        return "no prompt; the shape has one"
    return None


def _check_conversation(group: Any) -> str | None:
    if group.prompt is not None:
        return "a prompt; a conversation has none (its turns are the answer)"
    problem = _answers(group, [""])
    if problem is None and not isinstance(group.answers[""], list):
        return f"answer of type {type(group.answers['']).__name__}; a conversation is messages"
    return problem


def _check_prompt_completion(group: Any) -> str | None:
    return _answers(group, [""])


def _check_preference(group: Any) -> str | None:
    return _prompted(group) or _answers(group, ["chosen_", "rejected_"])


def _check_feedback(group: Any) -> str | None:
    problem = _prompted(group) or _answers(group, [""])
    if problem is None and not isinstance(group.values.get("label"), bool):
        return f"value label {group.values.get('label')!r}; the shape has a boolean"
    if problem is None and "prompt_id" not in group.values:
        return "no value prompt_id (align.data.formats.prompt_id(prompt))"
    return problem


def _check_prompt_only(group: Any) -> str | None:
    problem = _prompted(group) or _answers(group, [])
    if problem is None and "prompt" not in group.values:
        return "no value prompt (the prompt as the record gives it, for the rewards)"
    return problem


def _check_ranked(group: Any) -> str | None:
    problem = _prompted(group)
    count = len(group.answers)
    expected = [f"completion{i}_" for i in range(count)]
    problem = problem or (_answers(group, expected) if count >= 2 else "fewer than 2 answers")
    scores = group.values.get("scores")
    if problem is None and not (
        isinstance(scores, list)
        and len(scores) == count
        and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    ):
        return f"value scores {scores!r}; the shape has {count} finite floats, one per answer"
    return problem


# -- batches -------------------------------------------------------------------------------------
def _preference_batch(examples: list[dict], pad_token_id: int, packed: bool) -> dict[str, Any]:
    """``[chosen; rejected]`` rows: ``0..n-1`` chosen, ``n..2n-1`` rejected."""
    if not packed:
        return paired_batch(examples, pad_token_id)
    from .packing import pack_in_order

    n = len(examples)
    groups = [
        [(e[f"{side}_input_ids"], e[f"{side}_completion_mask"]) for side in ("chosen", "rejected")]
        for e in examples
    ]
    return pack_in_order(groups, [[i, n + i] for i in range(n)], pad_token_id)


def _feedback_batch(examples: list[dict], pad_token_id: int, packed: bool) -> dict[str, Any]:
    import torch

    batch = every_sequence_batch(examples, pad_token_id, packed)
    batch["labels"] = torch.tensor([bool(e["label"]) for e in examples])
    return batch


def ranked_prefixes(example: dict[str, Any]) -> list[str]:
    """An example's answers in order: ``completion0_``, ``completion1_``, …"""
    count = sum(1 for key in example if key.startswith("completion") and key.endswith("input_ids"))
    return [f"completion{i}_" for i in range(count)]


def _ranked_batch(examples: list[dict], pad_token_id: int, packed: bool) -> dict[str, Any]:
    """Every answer a row (sequence), example by example: example 0's answers in record order,
    then example 1's, …; ``scores`` (float) and ``group`` (the example of each sequence, 0..n-1)
    per sequence. Packed: each example's answers share its prompt."""
    import torch

    sequences, scores, group = [], [], []
    for index, example in enumerate(examples):
        prefixes = ranked_prefixes(example)
        sequences.append(
            [(example[f"{p}input_ids"], example[f"{p}completion_mask"]) for p in prefixes]
        )
        scores += example["scores"]
        group += [index] * len(prefixes)
    if packed:
        from .packing import pack

        batch = pack(sequences, pad_token_id)
    else:
        rows = [
            {"input_ids": ids, "completion_mask": mask} for seqs in sequences for ids, mask in seqs
        ]
        batch = sequence_batch(rows, pad_token_id)
    batch["scores"] = torch.tensor(scores, dtype=torch.float32)
    batch["group"] = torch.tensor(group, dtype=torch.long)
    return batch


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape(
            "conversation",
            "a conversation (messages), trained on its assistant turns",
            _check_conversation,
            every_sequence_batch,
        ),
        Shape(
            "prompt_completion",
            "a prompt and its completion, trained on the completion (or a whole text)",
            _check_prompt_completion,
            every_sequence_batch,
        ),
        Shape(
            "preference",
            "a prompt with a chosen and a rejected completion",
            _check_preference,
            _preference_batch,
        ),
        Shape(
            "feedback",
            "a prompt and one completion labelled desirable or undesirable (unpaired)",
            _check_feedback,
            _feedback_batch,
        ),
        Shape(
            "prompt_only",
            "a prompt to sample completions for (on-policy objectives)",
            _check_prompt_only,
            every_sequence_batch,
        ),
        Shape(
            "ranked",
            "a prompt with N ≥ 2 completions, each scored",
            _check_ranked,
            _ranked_batch,
        ),
    )
}
