"""GRPO without TRL: options and registration, hand-computed advantages and clipped losses, and
the counts the core reads before the forward."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

import align
from align.plugins.testing import _OneProcess
from align.rollout.batch import add_rewards, rollout_batch
from align_grpo import (
    GRPOOptions,
    align_compute_loss,
    align_loss_counts,
    align_prepare_rollouts,
)
from align_grpo.loss import clipped_token_losses, k3_kl

G = 3
LN3 = math.log(3)


# -- options and registration ---------------------------------------------------------------------
def test_option_defaults_are_trl_s():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import GRPOConfig
    trl = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    ours = GRPOOptions()
    for name in GRPOOptions.model_fields:
        assert getattr(ours, name) == trl[name], name
    assert ours.epsilon_upper == ours.epsilon == 0.2
    assert GRPOOptions(epsilon_high=0.28).epsilon_upper == 0.28


def test_scale_rewards_takes_trl_s_booleans_and_options_are_checked():
    assert GRPOOptions(scale_rewards=True).scale_rewards == "group"
    assert GRPOOptions(scale_rewards=False).scale_rewards == "none"
    for bad in (
        {"scale_rewards": "std"},
        {"loss_type": "cispo"},
        {"num_generations": 1},
        {"num_iterations": 0},
        {"beta": -0.1},
        {"epsilon": -1},
        {"num_generation": 4},
    ):
        with pytest.raises(ValidationError):
            GRPOOptions(**bad)


def test_the_objective_registers_on_policy_with_a_reference_only_for_beta():
    from align.plugins import load_plugins

    registered = load_plugins().objective("grpo")
    grpo = registered.item
    assert registered.plugin.distribution == "align-plugin-grpo"
    assert isinstance(grpo, align.Objective)
    assert grpo.shapes == ("prompt_only",) and grpo.on_policy and grpo.packable
    assert not grpo.disable_dropout  # TRL's GRPO default: disable_dropout=False
    assert grpo.options is GRPOOptions
    sampling = grpo.sampling(GRPOOptions(num_generations=4, num_iterations=3))
    assert sampling == align.Sampling(num_generations=4, reuse=3)
    assert grpo.sampling(GRPOOptions()) == align.Sampling(8, 1)
    assert not grpo.uses_reference(GRPOOptions())
    assert grpo.uses_reference(GRPOOptions(beta=0.04))


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, align_grpo\nsys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]


# -- advantages -----------------------------------------------------------------------------------
def _rollouts(rewards, completions, truncated=None, packed=False, prompts=((5,), (5,))):
    examples = [{"prompt_input_ids": list(p)} for p in prompts]
    truncated = truncated or [False] * len(completions)
    batch = rollout_batch(examples, completions, G, 0, packed, truncated)
    add_rewards(batch, ["r"], [1.0], [rewards])
    return batch


def _run(max_completion_length=2, accelerator=None):
    config = SimpleNamespace(max_completion_length=max_completion_length, temperature=1.0)
    return SimpleNamespace(accelerator=accelerator or _OneProcess(), config=config)


# Group 0 scores [1, 0, 0]: mean 1/3, unbiased std √(1/3) = 0.57735; group 1 scores alike.
# Over the round [1, 0, 0, 2, 2, 2] the unbiased std is 0.9831921.
EXPECTED_ADVANTAGES = {
    "group": [1.1545006, -0.5772503, -0.5772503, 0.0, 0.0, 0.0],  # (r − mean) / (std + 1e-4)
    "batch": [0.6779945, -0.3389973, -0.3389973, 0.0, 0.0, 0.0],
    "none": [2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_by_hand(scale):
    batch = _rollouts([1, 0, 0, 2, 2, 2], [[1, 2]] * 6)
    options = GRPOOptions(num_generations=G, scale_rewards=scale)
    align_prepare_rollouts(model=None, batches=[batch], options=options, run=_run())
    assert batch["advantages"].tolist() == pytest.approx(EXPECTED_ADVANTAGES[scale], abs=1e-6)
    zero = [0.0] * 6 if scale == "batch" else [0.0] * 3 + [1.0] * 3
    assert batch["zero_std"].tolist() == zero
    assert "old_logps" not in batch  # num_iterations = 1: the ratio is 1


def test_batch_scaling_spans_every_micro_batch_of_the_round():
    first = _rollouts([1, 0, 0, 2, 2, 2], [[1, 2]] * 6)
    second = _rollouts([3, 1, 2], [[1, 2]] * 3, prompts=((5,),))
    options = GRPOOptions(num_generations=G, scale_rewards="batch")
    align_prepare_rollouts(model=None, batches=[first, second], options=options, run=_run())
    std = torch.tensor([1, 0, 0, 2, 2, 2, 3, 1, 2.0]).std().item()  # unbiased
    assert second["advantages"].tolist() == pytest.approx(
        [1 / (std + 1e-4), -1 / (std + 1e-4), 0.0], abs=1e-6
    )


class _TwoProcesses(_OneProcess):
    """A second process that holds ``other`` rewards and answers each gather as the plugin's
    own code on it would (first its count and sum, then its squared deviations)."""

    num_processes = 2

    def __init__(self, other):
        super().__init__()
        self.other = other.double()
        self.calls = 0

    def gather(self, tensor):
        self.calls += 1
        if self.calls == 1:
            theirs = torch.stack([torch.tensor(float(len(self.other))), self.other.sum()])
            self.totals = tensor.reshape(-1) + theirs
        else:
            mean = self.totals[1] / self.totals[0]
            theirs = ((self.other - mean) ** 2).sum().reshape(1)
        return torch.cat([tensor, theirs.to(tensor.dtype).reshape(tensor.shape)])


def test_batch_std_is_taken_over_every_process_of_uneven_size():
    mine, theirs = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 2.0, 2.0, 5.0, 0.0, 1.0])
    std = align.round_mean_std([mine], _TwoProcesses(theirs))[1]
    assert std.item() == pytest.approx(torch.cat([mine, theirs]).std().item(), rel=1e-6)


# -- the clipped objective, by hand ---------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """A "model" whose logits are a parameter: log-probs are set exactly."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        return SimpleNamespace(logits=self.logits)


# Six completions of two prompts (the one-token prompt 0); token t of completion i follows
# position t of its row. Completion 1 has one token; completion 2 is truncated.
COMPLETIONS = [[1, 2], [1], [2, 1], [1, 1], [2, 2], [1, 2]]
TRUNCATED = [False, False, True, False, False, False]
# After sampling (logits 0: p = 1/3 everywhere) the policy moves: ratio ρ = p_new / p_old.
RATIOS = [[1.5, 0.9], [0.5], [1.3, 0.7], [2.0, 0.6], [1.0, 1.0], [1.1, 0.95]]
A0, A1 = 1.1545006, -0.5772503  # group 0's advantages; group 1's are 0
# −min(ρÂ, clip(ρ, 0.8, 1.2)Â) per token of group 0, worked by hand:
# ρ=1.5, Â>0: clipped, −1.2·A0; ρ=0.9: −0.9·A0; ρ=0.5, Â<0: clipped, −0.8·A1;
# ρ=1.3, Â<0: not clipped (the min keeps 1.3·A1), −1.3·A1; ρ=0.7, Â<0: clipped, −0.8·A1.
TOKEN_LOSSES = [[-1.2 * A0, -0.9 * A0], [-0.8 * A1], [-1.3 * A1, -0.8 * A1]]
CLIPPED = {(0, 0), (1, 0), (2, 1)}  # (completion, token): no gradient


def _moved_logits(batch_width):
    """Logits [6, width, 3] giving each completion token probability ρ/3."""
    logits = torch.zeros(len(COMPLETIONS), batch_width, 3, dtype=torch.float64)
    for i, (ids, ratios) in enumerate(zip(COMPLETIONS, RATIOS, strict=True)):
        for t, (target, ratio) in enumerate(zip(ids, ratios, strict=True)):
            p = ratio / 3
            logits[i, t] = math.log((1 - p) / 2)
            logits[i, t, target] = math.log(p)
    return logits


def _hand_batch(options, truncated=TRUNCATED):
    batch = _rollouts([1, 0, 0, 2, 2, 2], COMPLETIONS, truncated)
    width = batch["input_ids"].shape[1]
    model = FixedLogits(torch.zeros(len(COMPLETIONS), width, 3, dtype=torch.float64))
    align_prepare_rollouts(model=model, batches=[batch], options=options, run=_run())
    with torch.no_grad():
        model.logits.copy_(_moved_logits(width))
    return model, batch


def _by_hand(loss_type, masked):
    kept = TOKEN_LOSSES[:2] if masked else TOKEN_LOSSES
    lengths = [len(c) for c, t in zip(COMPLETIONS, TRUNCATED, strict=True) if not (masked and t)]
    total = sum(map(sum, kept))
    return {
        "dapo": total / sum(lengths),
        "bnpo": total / sum(lengths),  # one micro-batch: its token mean
        "grpo": sum(sum(seq) / len(seq) for seq in kept) / 6,
        "dr_grpo": total / (6 * 2),  # max_completion_length 2
    }[loss_type]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_clipped_objective_with_reused_rollouts_by_hand(loss_type, masked):
    options = GRPOOptions(
        num_generations=G, num_iterations=2, loss_type=loss_type, mask_truncated_completions=masked
    )
    model, batch = _hand_batch(options)
    old = batch["old_logps"][batch["completion_mask"][:, 1:].bool()]
    assert old.tolist() == pytest.approx([-LN3] * 11)  # the sampling policy's log-probs

    out = align_compute_loss(model=model, batch=batch, options=options, reference=None, run=_run())
    counts = align_loss_counts(batch=batch, options=options, config=_run().config)
    assert float(out.count) == float(counts["loss"])
    assert (out.loss / out.count).item() == pytest.approx(_by_hand(loss_type, masked), abs=1e-6)

    tokens = 9 if masked else 11
    extremes = {k: v for k, v in out.metrics.items() if isinstance(v, align.Extreme)}
    assert sorted(extremes) == ["clip_ratio/high_max", "clip_ratio/low_min"]
    sums = align.MetricSums()
    sums.add_all(extremes)
    # per sequence: low-clipped shares 0, 1, 1/2, 0, 0, 0; high-clipped 1/2, then 0
    assert sums.reduce() == {"clip_ratio/low_min": 0.0, "clip_ratio/high_max": 0.5}
    pairs = {k: v for k, v in out.metrics.items() if k not in extremes}
    metrics = {name: (float(s), float(c)) for name, (s, c) in pairs.items()}
    assert metrics["clip_ratio/low_mean"] == (1.0 if masked else 2.0, tokens)  # ρ=0.5, 0.7
    assert metrics["clip_ratio/high_mean"] == (1.0, tokens)  # ρ=1.5; ρ=2.0 has Â=0
    assert metrics["clip_ratio/region_mean"] == (2.0 if masked else 3.0, tokens)
    assert metrics["frac_reward_zero_std"] == (3.0, 6.0)
    assert "kl" not in metrics

    out.loss.backward()
    grad = model.logits.grad
    for i, ids in enumerate(COMPLETIONS):
        for t, target in enumerate(ids):
            g = grad[i, t, target].item()
            if i >= 3 or (masked and TRUNCATED[i]) or (i, t) in CLIPPED:
                assert g == 0.0, (i, t)
            else:  # d(−ρÂ)/dlogit_target = −ρÂ·(1 − p)
                ratio, adv = RATIOS[i][t], A0 if i == 0 else A1
                expected = -ratio * adv * (1 - ratio / 3)
                if loss_type == "grpo":
                    expected /= len(ids)
                if loss_type == "bnpo":
                    expected /= tokens
                assert g == pytest.approx(expected, rel=1e-5), (i, t)


def test_clip_higher_leaves_a_ratio_under_1_plus_epsilon_high_unclipped():
    ratio = torch.tensor([1.25, 1.25, 1.5, 0.75], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    losses = clipped_token_losses(ratio, adv, 0.2, 0.28)
    assert losses.tolist() == pytest.approx([-1.25, 1.25, -1.28, 0.8])
    losses.sum().backward()
    assert ratio.grad.tolist() == [-1.0, 1.0, 0.0, 0.0]


def test_k3_kl_by_hand():
    ref = torch.tensor([-1.0, -2.0, -0.5])
    logps = torch.tensor([-2.0, -1.0, -0.5])
    expected = [math.e - 1 - 1, math.exp(-1) + 1 - 1, 0.0]  # e^δ − δ − 1, δ = ref − logp
    assert k3_kl(ref, logps).tolist() == pytest.approx(expected, abs=1e-6)


# -- counts before the forward --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from align.demo import build_demo_model

    path = tmp_path_factory.mktemp("grpo-counts")
    build_demo_model(path, hidden_size=32, layers=1)
    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_counts_before_the_forward_equal_the_loss_s(tiny_model, loss_type, masked, packed):
    completions = [[40, 2], [41, 42, 43, 44], [2], [45, 46, 47, 48], [50, 2], [51, 52, 53, 54]]
    truncated = [ids[-1] != 2 for ids in completions]
    batch = _rollouts(
        [1, 0, 3, 2, 2, 1], completions, truncated, packed, prompts=((1, 30, 31), (1, 32))
    )
    options = GRPOOptions(num_generations=G, loss_type=loss_type, mask_truncated_completions=masked)
    run = _run(max_completion_length=4)
    align_prepare_rollouts(model=tiny_model, batches=[batch], options=options, run=run)
    counts = align_loss_counts(batch=batch, options=options, config=run.config)
    out = align_compute_loss(
        model=tiny_model, batch=batch, options=options, reference=None, run=run
    )
    assert float(out.count) == float(counts["loss"])
    expected = {
        "dapo": 2 + 1 + 2 + (0 if masked else 4 + 4 + 4),
        "grpo": 6,
        "dr_grpo": 6 * 4,
        "bnpo": 1,
    }[loss_type]
    assert float(counts["loss"]) == expected
    assert torch.isfinite(out.loss)
