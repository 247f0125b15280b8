"""MinorSFT (shared/objectives.md §4, vector M1) against an independent computation."""

import math

import pytest
import torch

from align_minorsft.loss import minor_weights, minorsft_example_losses, minorsft_loss

BETA = 0.1
POLICY_TOKENS = [-1.0, -0.5, -2.0, -0.5]
REF_TOKENS = [-1.2, -0.7, -2.1, -1.0]


class TokenLogits(torch.nn.Module):
    """Two-token vocabulary; logits chosen so each target token gets a given log-prob."""

    def __init__(self, logps):
        super().__init__()
        # target 1 with logit a, token 0 with logit 0: log p = a − log(1 + e^a)
        logits = [[0.0, math.log(math.exp(p) / (1 - math.exp(p)))] for p in logps]
        self.logits = torch.nn.Parameter(torch.tensor([[*logits, [0.0, 0.0], [0.0, 0.0]]]))

    def forward(self, input_ids, attention_mask, use_cache=False):
        return type("Out", (), {"logits": self.logits})()


class FixedReference:
    def __init__(self, value):
        self.value = value

    def sequence_logps(self, batch, prefix=""):
        return torch.tensor([self.value])


def _batch():
    ids = torch.tensor([[0, 1, 1, 1, 1, 0]])  # logits at 0..3 predict the completion at 1..4
    mask = torch.tensor([[0, 1, 1, 1, 1, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": mask}


def test_m1_loss_weight_gradient_and_deviation():
    model = TokenLogits(POLICY_TOKENS)
    output = minorsft_loss(model, _batch(), FixedReference(sum(REF_TOKENS)), BETA)
    assert output.loss.item() == pytest.approx(3.221983, abs=1e-5)
    assert output.count == 1
    means = {k: float(s) / float(c) for k, (s, c) in output.metrics.items()}
    assert means["minor_weight"] == pytest.approx(0.950042, abs=1e-6)
    assert means["deviation"] == pytest.approx(0.25, abs=1e-6)
    assert means["nll"] == pytest.approx(1.0, abs=1e-6)  # −(−4)/4

    policy = torch.tensor([sum(POLICY_TOKENS)], dtype=torch.float64, requires_grad=True)
    loss = minorsft_example_losses(
        policy, torch.tensor([sum(REF_TOKENS)]), torch.tensor([4.0]), BETA
    )
    loss.sum().backward()
    assert policy.grad.item() == pytest.approx(-0.237510, abs=1e-6)
    independent = 2 / (BETA * 4) * math.log1p(math.exp(-BETA * 1.0))
    assert loss.item() == pytest.approx(independent, abs=1e-12)


def test_at_initialisation_the_gradient_is_sfts_per_sequence_mean():
    policy = torch.tensor([-3.0, -8.0], dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([2.0, 5.0], dtype=torch.float64)
    minorsft_example_losses(policy, policy.detach(), tokens, BETA).sum().backward()
    assert policy.grad.tolist() == pytest.approx((-1 / tokens).tolist())  # d(−Σlogp/m)


def _by_hand_length_normalized(delta, m, beta):
    """float64 by hand: weight 2σ(−βΔ/m), loss (2/β)·softplus(−βΔ/m), dL/dΣlogp."""
    x = -beta * delta / m
    sigma = 1 / (1 + math.exp(-x))
    return 2 * sigma, 2 / beta * math.log1p(math.exp(x)), -(2 / m) * sigma


def test_m1_length_normalized_against_a_computation_by_hand():
    delta, m = sum(POLICY_TOKENS) - sum(REF_TOKENS), len(POLICY_TOKENS)  # Δ = 1.0, m = 4
    weight, loss, grad = _by_hand_length_normalized(delta, m, BETA)
    assert (weight, loss, grad) == pytest.approx((0.987501, 13.614506, -0.246875), abs=1e-6)

    output = minorsft_loss(
        TokenLogits(POLICY_TOKENS), _batch(), FixedReference(sum(REF_TOKENS)), BETA, True
    )
    assert output.loss.item() == pytest.approx(loss, abs=1e-5)
    means = {k: float(s) / float(c) for k, (s, c) in output.metrics.items()}
    assert means["minor_weight"] == pytest.approx(weight, abs=1e-6)
    assert means["deviation"] == pytest.approx(0.25, abs=1e-6)  # Δ/m, whatever σ reads
    assert means["nll"] == pytest.approx(1.0, abs=1e-6)

    policy = torch.tensor([sum(POLICY_TOKENS)], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([sum(REF_TOKENS)], dtype=torch.float64)
    tokens = torch.tensor([float(m)], dtype=torch.float64)
    example = minorsft_example_losses(policy, reference, tokens, BETA, length_normalized=True)
    example.sum().backward()
    assert example.item() == pytest.approx(loss, abs=1e-12)
    assert policy.grad.item() == pytest.approx(grad, abs=1e-12)


def test_length_normalized_weight_is_the_same_for_the_same_per_token_move():
    """Δ/m inside σ: two answers moved by the same 0.5 nats a token weigh the same, where the
    paper's summed Δ weighs the 40-token one 2σ(−2)/2σ(−0.25) ≈ 0.27 times the 5-token one."""
    delta = torch.tensor([2.5, 20.0], dtype=torch.float64)
    tokens = torch.tensor([5.0, 40.0], dtype=torch.float64)
    normalized = minor_weights(delta, tokens, BETA, length_normalized=True)
    assert normalized[0].item() == pytest.approx(normalized[1].item(), abs=1e-12)
    summed = minor_weights(delta, tokens, BETA)
    assert summed.tolist() == pytest.approx([2 / (1 + math.exp(0.25)), 2 / (1 + math.exp(2.0))])


def test_length_normalized_gradient_at_initialisation_is_sfts_per_sequence_mean():
    policy = torch.tensor([-3.0, -8.0], dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([2.0, 5.0], dtype=torch.float64)
    minorsft_example_losses(policy, policy.detach(), tokens, BETA, True).sum().backward()
    assert policy.grad.tolist() == pytest.approx((-1 / tokens).tolist())
