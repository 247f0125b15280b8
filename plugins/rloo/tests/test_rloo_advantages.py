"""The leave-one-out advantages against a hand computation of the paper's estimator (Ahmadian
et al. 2024: each sample's baseline is the mean reward of the other k − 1), the order of
TRL's reward shaping (clip, then the β-weighted sequence KL, then the baseline), the
normalisation over a round spread over two processes, and the options' validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import align_rloo.advantages as advantages_module
from align_rloo import RLOOOptions
from align_rloo.advantages import leave_one_out, prepare_rollouts, zero_std


def _by_hand(rewards, k):
    """``r_i − 1/(k−1) Σ_{j≠i} r_j``, group by group, with plain Python loops."""
    out = []
    for start in range(0, len(rewards), k):
        group = rewards[start : start + k]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            out.append(r - sum(others) / len(others))
    return out


def test_leave_one_out_is_the_paper_s_baseline():
    rewards = [1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 0.0, -1.5, 2.5]
    group = torch.arange(3).repeat_interleave(3)
    got = leave_one_out(torch.tensor(rewards), group)
    assert got.tolist() == pytest.approx(_by_hand(rewards, 3), abs=1e-6)
    assert got[:3].tolist() == pytest.approx([-2.0, -0.5, 2.5])  # 1 − 3, 2 − 2.5, 4 − 1.5
    # r_i − mean_{j≠i} r_j = k/(k−1) · (r_i − mean_j r_j): zero-sum within each group
    means = torch.tensor(rewards).view(3, 3).mean(1).repeat_interleave(3)
    assert torch.allclose(got, 1.5 * (torch.tensor(rewards) - means), atol=1e-6)
    assert got.view(3, 3).sum(1).abs().max() < 1e-6
    # groups need not be contiguous, and k = 2 is the difference of the pair
    pairs = leave_one_out(torch.tensor([5.0, 1.0, 2.0, 2.0]), torch.tensor([0, 1, 0, 1]))
    assert pairs.tolist() == pytest.approx([3.0, -1.0, -3.0, 1.0])


def test_zero_std_marks_groups_that_scored_alike():
    rewards = torch.tensor([1.0, 2.0, 3.0, 3.0, 0.5, 0.5])
    got = zero_std(rewards, torch.arange(3).repeat_interleave(2))
    assert got.tolist() == [False, False, True, True, True, True]


def _batch(rewards, k, kl=None):
    group = torch.arange(len(rewards) // k).repeat_interleave(k)
    batch = {"rewards": torch.tensor(rewards), "group": group}
    return batch, (None if kl is None else torch.tensor(kl))


def test_rewards_are_clipped_then_kl_penalised_then_baselined(monkeypatch):
    """TRL's order: clip the reward, subtract β·KL (the sequence's Σ_t log π_old − log π_ref),
    then the leave-one-out baseline over the penalised rewards."""
    batch, kl = _batch([0.5, 3.0, 1.0], 3, kl=[1.0, -2.0, 0.0])
    monkeypatch.setattr(advantages_module, "_policy_and_reference", lambda *a: (None, kl))
    options = RLOOOptions(num_generations=3, beta=0.5, reward_clip_range=[0.0, 2.0])
    run = SimpleNamespace(accelerator=None, config=SimpleNamespace(temperature=1.0))
    prepare_rollouts(None, [batch], options, None, run)
    shaped = [0.5 - 0.5 * 1.0, 2.0 + 0.5 * 2.0, 1.0]  # clipped to 2, then − β·KL
    assert batch["advantages"].tolist() == pytest.approx(_by_hand(shaped, 3), abs=1e-6)
    assert batch["advantages"].tolist() == pytest.approx([-2.0, 2.5, -0.5], abs=1e-6)
    assert torch.equal(batch["kl"], kl)
    assert "old_logps" not in batch


class _TwoProcesses:
    """An accelerator of process 0 of two whose peer holds ``other``: ``gather`` answers with
    the peer's share of each exchange ``round_mean_std`` makes."""

    num_processes = 2

    def __init__(self, other: torch.Tensor, mean_of_all: float) -> None:
        other = other.double()
        self.replies = [
            torch.stack([other.new_tensor(float(other.numel())), other.sum()]),
            ((other - mean_of_all) ** 2).sum().reshape(1),
        ]

    def gather(self, tensor):
        return torch.cat([tensor, self.replies.pop(0).unsqueeze(0).to(tensor.dtype)])


def test_normalisation_spans_every_micro_batch_on_every_process():
    """``normalize_advantages``: over the round's advantages on all processes, unbiased std,
    ``(A − mean) / (std + 1e-4)``; here process 0 holds two micro-batches and its peer one."""
    k = 2
    mine = [_batch([1.0, 3.0, 0.0, 0.5], k)[0], _batch([2.0, 2.0], k)[0]]
    peer = _batch([4.0, -4.0, 1.0, 0.0], k)[0]
    every = torch.tensor(_by_hand([1.0, 3.0, 0.0, 0.5, 2.0, 2.0, 4.0, -4.0, 1.0, 0.0], k))
    expected = (every - every.mean()) / (every.std(unbiased=True) + 1e-4)
    peer_advantages = leave_one_out(peer["rewards"], peer["group"])
    run = SimpleNamespace(
        accelerator=_TwoProcesses(peer_advantages, every.double().mean().item()),
        config=SimpleNamespace(temperature=1.0),
    )
    options = RLOOOptions(num_generations=k, beta=0.0, normalize_advantages=True)
    prepare_rollouts(None, mine, options, None, run)
    got = torch.cat([b["advantages"] for b in mine])
    assert torch.allclose(got, expected[:6], atol=1e-6)
    assert not run.accelerator.replies  # both exchanges happened


def test_options_follow_trl_s_defaults_and_refuse_bad_values():
    options = RLOOOptions()
    assert (options.num_generations, options.beta, options.num_iterations) == (2, 0.05, 1)
    assert (options.epsilon, options.epsilon_upper) == (0.2, 0.2)
    assert not options.normalize_advantages and not options.mask_truncated_completions
    assert options.reward_clip_range is None
    with pytest.raises(ValueError, match="the minimum is above the maximum"):
        RLOOOptions(reward_clip_range=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least 2 items"):
        RLOOOptions(reward_clip_range=[1.0])
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        RLOOOptions(num_generations=1)
    with pytest.raises(ValueError, match="Extra inputs"):
        RLOOOptions(loss_type="dapo")  # RLOO has one normalisation: the mean over completions
