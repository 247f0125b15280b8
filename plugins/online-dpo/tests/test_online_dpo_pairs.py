"""Which sample of a prompt is chosen: rewards, ties (TRL: the first sample), and the
missing-EOS penalty, on the rollout batch the core builds."""

import pytest
import torch

import align
from align.rollout.batch import add_rewards, rollout_batch
from align_online_dpo import OnlineDPOOptions, align_prepare_rollouts
from align_online_dpo.pairs import pair_rows, with_pairs


def _batch(rewards, truncated=None, packed=False):
    """Rollouts of len(rewards) / 2 prompts, as align builds them (prompt by prompt)."""
    prompts = len(rewards) // 2
    examples = [{"prompt_input_ids": [1, 5 + i, 6]} for i in range(prompts)]
    completions = [[7 + (j % 5)] * (1 + j % 3) for j in range(len(rewards))]
    truncated = truncated or [False] * len(rewards)
    batch = rollout_batch(examples, completions, 2, 0, packed, truncated)
    add_rewards(batch, ["r"], [1.0], [rewards])
    return batch


@pytest.mark.parametrize("packed", [False, True])
def test_the_higher_reward_is_chosen_whichever_sample_it_is(packed):
    batch = with_pairs(_batch([0.0, 1.0, 2.0, -1.0, 0.5, 0.25], packed=packed), None)
    assert batch["chosen_rows"].tolist() == [1, 2, 4]
    assert batch["rejected_rows"].tolist() == [0, 3, 5]
    assert batch["scores"].tolist() == [0.0, 1.0, 2.0, -1.0, 0.5, 0.25]


def test_a_tie_goes_to_the_first_sample_as_in_trl():
    batch = with_pairs(_batch([1.0, 1.0, 0.0, 0.0, -3.5, -3.5]), None)
    assert batch["chosen_rows"].tolist() == [0, 2, 4]
    assert batch["rejected_rows"].tolist() == [1, 3, 5]


def test_missing_eos_penalty_is_subtracted_before_the_order():
    rewards = [1.0, 0.5, 1.0, 1.0, 0.0, 3.0]
    truncated = [True, False, False, True, False, True]
    plain = with_pairs(_batch(rewards, truncated), None)
    assert plain["chosen_rows"].tolist() == [0, 2, 5]
    penalised = with_pairs(_batch(rewards, truncated), 1.0)
    assert penalised["scores"].tolist() == [0.0, 0.5, 1.0, 0.0, 0.0, 2.0]
    # prompt 0: 1 − 1 < 0.5; prompt 1: the tie is broken by the penalty; prompt 2: 3 − 1 > 0
    assert penalised["chosen_rows"].tolist() == [1, 2, 5]
    assert penalised["rejected_rows"].tolist() == [0, 3, 4]
    # a penalty that makes a tie: the first sample again
    tied = with_pairs(_batch([1.5, 0.5], [True, False]), 1.0)
    assert tied["chosen_rows"].tolist() == [0]


def test_pairs_follow_the_group_not_the_row_position():
    group = torch.tensor([1, 0, 0, 1])
    chosen, rejected = pair_rows(group, torch.tensor([0.0, 2.0, 3.0, 0.0]))
    assert chosen.tolist() == [2, 0]  # prompt 0: rows 1, 2; prompt 1: rows 0, 3 (a tie)
    assert rejected.tolist() == [1, 3]


def test_not_two_samples_per_prompt_is_an_error():
    with pytest.raises(align.PluginError, match="exactly 2 completions per prompt"):
        pair_rows(torch.tensor([0, 0, 0, 1, 1, 1]), torch.zeros(6))
    with pytest.raises(align.PluginError, match="exactly 2 completions per prompt"):
        pair_rows(torch.tensor([0, 0, 1]), torch.zeros(3))


def test_the_hook_orders_every_batch_of_the_round():
    batches = [_batch([0.0, 1.0]), _batch([2.0, 1.0, 0.0, 0.0], [False, False, True, False])]
    options = OnlineDPOOptions(missing_eos_penalty=0.5)
    out = align_prepare_rollouts(batches=batches, options=options)
    assert [b["chosen_rows"].tolist() for b in out] == [[1], [0, 3]]
    assert "chosen_rows" not in batches[0]  # the batches handed in are left as they were
    assert out[1]["input_ids"] is batches[1]["input_ids"]
