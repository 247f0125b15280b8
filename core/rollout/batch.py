"""A round's completions laid out as rollout batches (``align.Sampling`` lists the keys).

Every completion follows its prompt's tokens as one sequence, trained on the completion; the
``num_generations`` sequences of one prompt are one group, so the packed layout computes the
prompt once for the group, in the policy's forward and the reference's.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.batching import sequence_batch
from ..data.fields import collate
from .mixed import sampling_prompt


def rollout_batch(
    examples: list[dict[str, Any]],
    completions: list[list[int]],
    num_generations: int,
    pad_token_id: int,
    packed: bool,
    truncated: list[bool],
) -> dict[str, Any]:
    """The batch of ``examples`` (prompts) and their completions, prompt by prompt."""
    groups = []
    for i, example in enumerate(examples):
        prompt = sampling_prompt(example)
        group = []
        for ids in completions[i * num_generations : (i + 1) * num_generations]:
            group.append((list(prompt) + list(ids), [0] * len(prompt) + [1] * len(ids)))
        groups.append(group)
    if packed:
        from ..data.packing import pack

        batch = pack(groups, pad_token_id)
    else:
        rows = [{"input_ids": ids, "completion_mask": mask} for g in groups for ids, mask in g]
        batch = sequence_batch(rows, pad_token_id)
    batch["group"] = torch.arange(len(examples)).repeat_interleave(num_generations)
    batch["truncated"] = torch.tensor(truncated, dtype=torch.bool)
    batch["completion_lengths"] = torch.tensor([len(c) for c in completions], dtype=torch.long)
    return batch


def add_rewards(
    batch: dict[str, Any], names: list[str], weights: list[float], values: list[list[float]]
) -> None:
    """``rewards/<name>`` per reward and ``rewards``, their weighted sum, per sequence (none
    without rewards)."""
    if not names:
        return
    table = torch.tensor(values, dtype=torch.float32).reshape(len(names), -1)
    for name, row in zip(names, table, strict=True):
        batch[f"rewards/{name}"] = row
    batch["rewards"] = (torch.tensor(weights, dtype=torch.float32).unsqueeze(-1) * table).sum(0)


def add_fields(batch: dict[str, Any], examples: list[dict[str, Any]], names: list[str]) -> None:
    """The record fields, one value per prompt (as in every batch), where not already set."""
    batch.update(collate(examples, [n for n in names if n not in batch]))
