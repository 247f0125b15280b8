"""Which of a prompt's two samples is chosen: the annotator's verdict of OAIF, here the run's
reward functions, as TRL's ``OnlineDPOTrainer`` takes it.

A sample's *score* is its reward (the weighted sum of the reward functions, ``batch["rewards"]``)
less ``missing_eos_penalty`` when it ends without EOS (``batch["truncated"]``). The sample with
the higher score is chosen; on a tie the first sample is (TRL: ``first_half >= second_half``,
its first half being each prompt's first sample). The order of a prompt's samples is the order
they were sampled in, which carries no information, so the tie rule favours neither.
"""

from __future__ import annotations

from typing import Any

import torch

import align

KEYS = ("chosen_rows", "rejected_rows", "scores")


def scores(batch: dict[str, Any], missing_eos_penalty: float | None) -> torch.Tensor:
    """Each sequence's reward, less ``missing_eos_penalty`` where it has no EOS (float32)."""
    rewards = batch["rewards"].float()
    if missing_eos_penalty is None:
        return rewards.clone()
    truncated = batch["truncated"].to(rewards.device).bool()
    return rewards - missing_eos_penalty * truncated.float()


def pair_rows(group: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and the rejected sequence of every prompt (indices into the batch's sequence
    order, one per prompt, in prompt order), from each sequence's prompt (``group``) and score.
    Every prompt must have exactly two sequences."""
    group = group.long()
    prompts = int(group.max()) + 1 if group.numel() else 0
    counts = torch.bincount(group, minlength=prompts)
    if group.numel() == 0 or (counts != 2).any():
        found = sorted(set(counts.tolist())) if group.numel() else [0]
        raise align.PluginError(
            "online-dpo needs exactly 2 completions per prompt in a rollout batch, got "
            f"{', '.join(map(str, found))}"
        )
    rows = torch.sort(group, stable=True).indices.view(prompts, 2)  # sampling order kept
    first, second = rows[:, 0], rows[:, 1]
    score = score.to(rows.device)
    first_wins = score[first] >= score[second]  # a tie goes to the first sample, as in TRL
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    return chosen, rejected


def with_pairs(batch: dict[str, Any], missing_eos_penalty: float | None) -> dict[str, Any]:
    """``batch`` with ``chosen_rows`` and ``rejected_rows`` (one per prompt) and ``scores``
    (one per sequence: the rewards after ``missing_eos_penalty``)."""
    score = scores(batch, missing_eos_penalty)
    chosen, rejected = pair_rows(batch["group"], score)
    return {**batch, "chosen_rows": chosen, "rejected_rows": rejected, "scores": score}
