"""KTO losses (shared/objectives.md §3, vectors K1 and K2) and an independent computation."""

import math

import pytest
import torch

from align_kto import derived_metrics
from align_kto.loss import kto_example_losses, reference_point

BETA = 0.1
LABELS = torch.tensor([True, True, False, False])
POLICY, REF = [-10.0, -12.0, -15.0, -9.0], [-11.0, -12.0, -13.0, -10.0]
MISMATCHED_POLICY, MISMATCHED_REF = [-20.0, -18.0, -22.0, -25.0], [-21.0, -18.5, -21.0, -25.5]


def _rewards(requires_grad=False):
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=requires_grad)
    return policy, policy - torch.tensor(REF, dtype=torch.float64)


def _z0(shift=0.0):
    return reference_point(torch.tensor(MISMATCHED_POLICY) + shift, torch.tensor(MISMATCHED_REF))


def _independent_logistic(z0, weights):
    out = []
    for p, r, desirable in zip(POLICY, REF, LABELS.tolist(), strict=True):
        gain = BETA * ((p - r) - z0) if desirable else BETA * (z0 - (p - r))
        out.append(weights[desirable] * (1 - 1 / (1 + math.exp(-gain))))
    return out


def test_k1_reference_point_and_clamp():
    assert _z0().item() == pytest.approx(0.25, abs=1e-6)
    assert _z0(shift=-3.0).item() == 0.0  # raw mean −2.75, clamped at 0
    ratios = torch.tensor([0.5, 1.0], requires_grad=True)
    assert not reference_point(ratios, torch.zeros(2)).requires_grad  # detached


def test_k1_logistic_losses_and_weights():
    _, rewards = _rewards()
    losses = kto_example_losses(rewards, _z0(), LABELS, BETA)
    assert losses.tolist() == pytest.approx([0.481259, 0.506250, 0.443986, 0.518741], abs=1e-6)
    assert losses.mean().item() == pytest.approx(0.487559, abs=1e-6)
    assert losses.tolist() == pytest.approx(_independent_logistic(0.25, {True: 1, False: 1}))
    weighted = kto_example_losses(rewards, _z0(), LABELS, BETA, undesirable_weight=2.0)
    assert weighted.mean().item() == pytest.approx(0.728241, abs=1e-6)
    assert weighted.tolist() == pytest.approx(_independent_logistic(0.25, {True: 1, False: 2}))


def test_k1_gradient_through_the_policy_logps():
    policy, rewards = _rewards(requires_grad=True)
    kto_example_losses(rewards, _z0(), LABELS, BETA).mean().backward()
    expected = [-0.0062412, -0.0062490, 0.0061716, 0.0062412]
    assert policy.grad.tolist() == pytest.approx(expected, abs=1e-7)


def test_k2_kahneman_tversky_utility():
    policy, rewards = _rewards(requires_grad=True)
    losses = kto_example_losses(rewards, _z0(), LABELS, BETA, utility="kahneman-tversky")
    assert losses.tolist() == pytest.approx([-0.101251, 0.085494, -0.267866, 0.227815], abs=1e-6)
    assert losses.mean().item() == pytest.approx(-0.013952, abs=1e-6)
    losses.mean().backward()
    expected = [-0.0299726, -0.0767023, 0.0262984, 0.0674384]
    assert policy.grad.tolist() == pytest.approx(expected, abs=1e-7)
    gains = [0.075, -0.025, 0.225, -0.075]  # and the value function written out
    independent = [
        -((abs(g) + 1e-3) ** 0.88 - 1e-3**0.88) * (1 if g >= 0 else -2.25) for g in gains
    ]
    assert losses.tolist() == pytest.approx(independent, abs=1e-9)


def test_kahneman_tversky_slope_at_exactly_zero_is_the_gain_sides():
    """At step 1 every gain is exactly 0: the slope there must be α·ε^(α−1) ≈ 2.016, not the
    0 that |g| gives (a run that could never leave its starting weights)."""
    slope = 0.88 * 1e-3 ** (0.88 - 1)
    assert slope == pytest.approx(2.016, abs=1e-3)
    rewards = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    weights = {True: 1.5, False: 2.0}
    losses = kto_example_losses(
        rewards, 0.0, LABELS, BETA, weights[True], weights[False], "kahneman-tversky"
    )
    assert losses.tolist() == [0.0] * 4  # the step-1 loss is 0, not 0.5·w
    losses.sum().backward()
    # g = β(r − z0) for a desirable example, β(z0 − r) for an undesirable one: dL/dg = −w·2.016
    expected = [-BETA * weights[True] * slope] * 2 + [BETA * weights[False] * slope] * 2
    assert rewards.grad.tolist() == pytest.approx(expected, rel=1e-12)
    gain = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # dL/dg itself
    kto_example_losses(
        gain / BETA, 0.0, LABELS[:1], BETA, 1.0, 1.0, "kahneman-tversky"
    ).sum().backward()
    assert gain.grad.item() == pytest.approx(-2.016, abs=1e-3)


def _kt_value(g):
    """The spec's slope-bounded value function, written out (float)."""
    side = (abs(g) + 1e-3) ** 0.88 - 1e-3**0.88
    return side if g >= 0 else -2.25 * side


def test_kahneman_tversky_slopes_either_side_of_the_dead_band():
    """Outside |g| ≤ ε = 1e-3 the slopes are the value function's own (λ_KT times steeper on
    the loss side); inside it the gradient is the gain side's slope at 0 whatever the sign of
    g, so float noise around a step-1 gain of 0 cannot pick it. The value is v(g) throughout."""
    slope = 0.88 * 1e-3 ** (0.88 - 1)
    inside = [1e-9, -1e-9, 1e-6, -1e-6, 5e-4, -5e-4, 0.999e-3, -0.999e-3]
    outside = [1.5e-3, -1.5e-3, 0.075, -0.075]
    gains = torch.tensor(inside + outside, dtype=torch.float64, requires_grad=True)
    labels = torch.ones(len(gains), dtype=torch.bool)
    losses = kto_example_losses(gains / BETA, 0.0, labels, BETA, 1.0, 1.0, "kahneman-tversky")
    assert losses.tolist() == pytest.approx([-_kt_value(g) for g in inside + outside], abs=1e-12)
    losses.sum().backward()
    one_sided = [-0.88 * (abs(g) + 1e-3) ** (0.88 - 1) * (1 if g >= 0 else 2.25) for g in outside]
    assert gains.grad.tolist() == pytest.approx([-slope] * len(inside) + one_sided, rel=1e-9)
    noisy = torch.tensor([3e-7, -3e-7, 0.0], requires_grad=True)  # float32 step-1 noise
    kto_example_losses(
        noisy / BETA, 0.0, labels[:3], BETA, 1.0, 1.0, "kahneman-tversky"
    ).sum().backward()
    assert torch.equal(noisy.grad, torch.full((3,), -slope, dtype=torch.float32))


@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_at_initialisation_every_loss_is_half_the_weight(weight):
    zeros = torch.zeros(4)
    for utility, expected in (("logistic", 0.5 * weight), ("kahneman-tversky", 0.0)):
        losses = kto_example_losses(
            zeros, reference_point(zeros, zeros), LABELS, BETA, weight, weight, utility
        )
        assert losses.tolist() == pytest.approx([expected] * 4)


def test_margins_need_both_classes():
    assert derived_metrics({"rewards/chosen": 0.3, "rewards/rejected": -0.1}) == {
        "rewards/margins": pytest.approx(0.4)
    }
    assert derived_metrics({"rewards/chosen": 0.3}) == {}
