"""Mixed rounds (``Sampling(on_policy_share=λ)``, GKD's λ): each round either samples from
the policy or not (the data's own completions, or with ``teacher_samples`` the teacher's
samples), by a draw every process makes alike; and the prompt a record is sampled after."""

from __future__ import annotations

import random
from typing import Any


def round_on_policy(seed: int, round_index: int, share: float) -> bool:
    """Whether round ``round_index`` (0-based, training) samples from the policy: a uniform draw
    below ``share``, from a generator seeded by the run's ``seed`` and the round alone, so every
    process, and a run resumed at any step, draws the same."""
    if share >= 1:
        return True
    if share <= 0:
        return False
    return random.Random(f"align-on-policy:{seed}:{round_index}").random() < share


def sampling_prompt(example: dict[str, Any]) -> list[int]:
    """The tokens to sample a completion after: a ``prompt_only`` example's prompt, or a
    sequence's tokens before its last trained span (a conversation's turns before its last
    assistant turn, a prompt-completion pair's prompt), as GKD's collator cuts them."""
    if "prompt_input_ids" in example:
        return list(example["prompt_input_ids"])
    ids, mask = list(example["input_ids"]), list(example["completion_mask"])
    start = len(mask)
    while start > 0 and not mask[start - 1]:  # past the trailing untrained tokens
        start -= 1
    while start > 0 and mask[start - 1]:  # back to the first token of the last trained span
        start -= 1
    return ids[: max(start, 1)]
