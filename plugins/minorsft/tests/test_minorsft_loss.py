"""MinorSFT (shared/objectives.md §4, vector M1) against an independent computation."""

import math

import pytest
import torch

from align_minorsft.loss import minorsft_example_losses, minorsft_loss

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
