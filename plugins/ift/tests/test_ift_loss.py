"""IFT relation propagation (shared/objectives.md §5, vector I1) and the λ schedule."""

from types import SimpleNamespace

import pytest
import torch

import align
from align_ift import IFTOptions, align_prepare_dataset, current_lambda
from align_ift.loss import discounted_suffix_sums, ift_sequence_losses, relation_weights

NLL = [1.0, 2.0, 0.5, 0.5]


def _loss(gamma, requires_grad=False):
    nll = torch.tensor([NLL], dtype=torch.float64, requires_grad=requires_grad)
    return ift_sequence_losses(nll, torch.ones(1, 4, dtype=torch.float64), gamma), nll


def _independent(gamma, nll=NLL):
    """The official code's weights written out: item = ℓ/T, suffix sums, normalised to mean 1."""
    items = [x / len(nll) for x in nll]
    suffix = [sum(gamma ** (j - t) * items[j] for j in range(t, 4)) for t in range(4)]
    weights = [c * 4 / sum(suffix) for c in suffix]
    return sum(x * w for x, w in zip(nll, weights, strict=True)) / 4


def test_i1_gamma_zero_is_the_official_special_case():
    loss, nll = _loss(0.0)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    assert relation_weights(nll, torch.ones(1, 4), 0.0).tolist() == [[1.0] * 4]
    assert _loss(1e-9)[0].item() == pytest.approx(1.375, abs=1e-6)  # the formula's limit differs


def test_i1_weights_and_losses():
    nll = torch.tensor([NLL], dtype=torch.float64)
    weights = relation_weights(nll, torch.ones(1, 4, dtype=torch.float64), 0.95)
    assert weights[0].tolist() == pytest.approx([1.848112, 1.430721, 0.476703, 0.244463], abs=1e-6)
    assert _loss(0.95)[0].item() == pytest.approx(1.267535, abs=1e-6)
    assert _loss(1.0)[0].item() == pytest.approx(1.264706, abs=1e-6)
    for gamma in (0.5, 0.95, 1.0):
        assert _loss(gamma)[0].item() == pytest.approx(_independent(gamma), abs=1e-12)


def test_i1_gradient_keeps_the_weights_in_the_graph():
    loss, nll = _loss(0.95, requires_grad=True)
    loss.sum().backward()
    assert nll.grad[0].tolist() == pytest.approx(
        [0.429327, 0.416145, 0.080900, -0.069063], abs=1e-6
    )
    # The independent computation's slope (central differences of the written-out loss): it
    # follows the weights' dependence on ℓ, which detached weights would drop (their gradient
    # is w/T = [0.462028, 0.357680, 0.119176, 0.061116]).
    h = 1e-6
    numeric = []
    for t in range(4):
        up, down = list(NLL), list(NLL)
        up[t] += h
        down[t] -= h
        numeric.append((_independent(0.95, up) - _independent(0.95, down)) / (2 * h))
    assert nll.grad[0].tolist() == pytest.approx(numeric, abs=1e-8)


def test_masked_positions_get_no_weight_and_rows_are_independent():
    nll = torch.tensor([[0.0, 1.0, 2.0, 0.5, 0.5, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float32)
    weights = relation_weights(nll, mask, 0.95)
    assert weights[0, [0, 5]].tolist() == [0.0, 0.0]
    expected = [1.848112, 1.430721, 0.476703, 0.244463]
    assert weights[0, 1:5].tolist() == pytest.approx(expected, abs=1e-6)
    assert weights[1].tolist() == pytest.approx([0, 0, 1.0, 0, 0, 0])
    losses = ift_sequence_losses(nll, mask, 0.95)
    assert losses.tolist() == pytest.approx([1.267535, 3.0], abs=1e-5)


def test_discounted_suffix_sums():
    values = torch.tensor([[1.0, 2.0, 3.0]])
    assert discounted_suffix_sums(values, 0.5).tolist() == [[1 + 1 + 0.75, 2 + 1.5, 3.0]]


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [("constant", 0, 0.2), ("linear", 0, 0.0), ("linear", 5, 0.1), ("linear", 10, 0.2)],
)
def test_lambda_schedule(schedule, step, expected):
    options = IFTOptions(**{"lambda": 0.2, "lambda_schedule": schedule})
    run = SimpleNamespace(
        step=step, max_steps=100, config=SimpleNamespace(warmup_steps=10, warmup_ratio=0.0)
    )
    assert current_lambda(options, run) == pytest.approx(expected)
    ratio = SimpleNamespace(warmup_steps=0, warmup_ratio=0.1)  # 10% of 100 steps
    by_ratio = SimpleNamespace(step=step, max_steps=100, config=ratio)
    assert current_lambda(options, by_ratio) == pytest.approx(expected)


def test_a_linear_schedule_needs_a_warm_up():
    options = IFTOptions(lambda_schedule="linear")
    with pytest.raises(align.ConfigError, match="lambda_schedule=linear warms λ up"):
        align_prepare_dataset(options, SimpleNamespace(warmup_steps=0, warmup_ratio=0.0))
    align_prepare_dataset(options, SimpleNamespace(warmup_steps=5, warmup_ratio=0.0))
    align_prepare_dataset(IFTOptions(), SimpleNamespace(warmup_steps=0, warmup_ratio=0.0))
