"""Statistics an on-policy objective takes over a round's completions, shared by the
first-party ones (GRPO's group-relative advantages and ``scale_rewards="batch"``, RLOO's
``frac_reward_zero_std`` and ``normalize_advantages``) and open to third-party objectives as
``align.group_statistics`` and ``align.round_mean_std``."""

from __future__ import annotations

from typing import Any

import torch


def group_statistics(
    values: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's group mean and unbiased group standard deviation (NaN for a group of
    one, as ``trl.trainer.utils.nanstd``); ``group`` holds each completion's prompt index."""
    _, inverse = torch.unique(group, return_inverse=True)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = values.new_zeros(groups)
    counts = zeros.index_add(0, inverse, torch.ones_like(values))
    means = zeros.index_add(0, inverse, values) / counts
    deviations = values - means[inverse]
    variances = zeros.index_add(0, inverse, deviations * deviations) / (counts - 1)
    return means[inverse], variances.sqrt()[inverse]


def round_mean_std(values: list[torch.Tensor], accelerator: Any) -> tuple[Any, Any]:
    """The mean and unbiased standard deviation (float64; NaN for a single value) of every value
    of the round's batches, on every process (``accelerator`` None: this one).

    Processes exchange two sums each (count and total, then squared deviations from the
    common mean), so their micro-batches may differ in size.
    """
    local = torch.cat([v.reshape(-1) for v in values]).double()
    distributed = accelerator is not None and accelerator.num_processes > 1

    def total(sums: torch.Tensor) -> torch.Tensor:
        if distributed:
            return accelerator.gather(sums.unsqueeze(0)).reshape(-1, sums.numel()).sum(0)
        return sums

    count, sum_ = total(torch.stack([local.new_tensor(float(local.numel())), local.sum()]))
    mean = sum_ / count
    squares = total(((local - mean) ** 2).sum().reshape(1))[0]
    std = (squares / (count - 1)).sqrt() if count > 1 else squares.new_tensor(float("nan"))
    return mean, std
