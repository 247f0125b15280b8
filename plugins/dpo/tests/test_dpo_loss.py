"""DPO losses and metrics (shared/objectives.md §2, vector D1) and an independent computation."""

import math

import pytest
import torch
from pydantic import ValidationError

from align_dpo import DPOOptions
from align_dpo.loss import dpo_pair_losses, preference_metrics

BETA = 0.1
POLICY_CHOSEN, POLICY_REJECTED = [-10.0, -20.0], [-12.0, -15.0]
REF_CHOSEN, REF_REJECTED = [-11.0, -18.0], [-11.0, -16.0]
CHOSEN_TOKENS, REJECTED_TOKENS = [4.0, 5.0], [2.0, 3.0]


def _losses(loss_type, label_smoothing=0.0, chosen=None, requires_grad=False):
    chosen = torch.tensor(chosen or POLICY_CHOSEN, dtype=torch.float64, requires_grad=requires_grad)
    losses = dpo_pair_losses(
        chosen,
        torch.tensor(POLICY_REJECTED, dtype=torch.float64),
        torch.tensor(REF_CHOSEN, dtype=torch.float64),
        torch.tensor(REF_REJECTED, dtype=torch.float64),
        torch.tensor(CHOSEN_TOKENS, dtype=torch.float64),
        torch.tensor(REJECTED_TOKENS, dtype=torch.float64),
        BETA,
        loss_type,
        label_smoothing,
    )
    return losses, chosen


def _neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


def _independent(loss_type, eps=0.0):
    """The variants of §2 written out with the math module, pair by pair."""
    out = []
    for pw, pl, rw, rl, mw, ml in zip(
        POLICY_CHOSEN,
        POLICY_REJECTED,
        REF_CHOSEN,
        REF_REJECTED,
        CHOSEN_TOKENS,
        REJECTED_TOKENS,
        strict=True,
    ):
        dw, dl = pw - rw, pl - rl
        z = BETA * (dw - dl)
        if loss_type == "sigmoid":
            out.append((1 - eps) * _neg_log_sigmoid(z) + eps * _neg_log_sigmoid(-z))
        elif loss_type == "robust":
            out.append(
                ((1 - eps) * _neg_log_sigmoid(z) - eps * _neg_log_sigmoid(-z)) / (1 - 2 * eps)
            )
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - z))
        elif loss_type == "ipo":
            out.append((dw / mw - dl / ml - 1 / (2 * BETA)) ** 2)
        elif loss_type == "minor":
            out.append(_neg_log_sigmoid(BETA * (dw - max(0.0, dl))))
    return sum(out) / len(out)


@pytest.mark.parametrize(
    ("loss_type", "eps", "expected"),
    [
        ("sigmoid", 0.0, 0.726247),
        ("sigmoid", 0.1, 0.721247),  # conservative DPO
        ("robust", 0.1, 0.732497),
        ("hinge", 0.0, 1.05),
        ("ipo", 0.0, 25.466806),
        ("minor", 0.0, 0.749376),
    ],
)
def test_d1_mean_loss_per_type(loss_type, eps, expected):
    losses, _ = _losses(loss_type, eps)
    assert losses.mean().item() == pytest.approx(expected, abs=1e-5)
    assert losses.mean().item() == pytest.approx(_independent(loss_type, eps), abs=1e-9)


def test_d1_sigmoid_per_pair_and_gradient():
    losses, chosen = _losses("sigmoid", requires_grad=True)
    assert losses.tolist() == pytest.approx([0.598139, 0.854355], abs=1e-6)
    losses.mean().backward()
    assert chosen.grad.tolist() == pytest.approx([-0.022508, -0.028722], abs=1e-6)
    rejected = torch.tensor(POLICY_REJECTED, dtype=torch.float64, requires_grad=True)
    dpo_pair_losses(
        torch.tensor(POLICY_CHOSEN, dtype=torch.float64),
        rejected,
        torch.tensor(REF_CHOSEN, dtype=torch.float64),
        torch.tensor(REF_REJECTED, dtype=torch.float64),
        torch.tensor(CHOSEN_TOKENS),
        torch.tensor(REJECTED_TOKENS),
        BETA,
        "sigmoid",
    ).mean().backward()
    assert rejected.grad.tolist() == pytest.approx([0.022508, 0.028722], abs=1e-6)


def test_d1_metrics():
    metrics = preference_metrics(
        torch.tensor(POLICY_CHOSEN),
        torch.tensor(POLICY_REJECTED),
        torch.tensor(REF_CHOSEN),
        torch.tensor(REF_REJECTED),
        BETA,
    )
    means = {name: float(total) / count for name, (total, count) in metrics.items()}
    assert means["rewards/chosen"] == pytest.approx(-0.05, abs=1e-6)
    assert means["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert means["rewards/accuracies"] == 0.5
    assert means["rewards/margins"] == pytest.approx(-0.05, abs=1e-6)
    assert means["logps/chosen"] == -15.0 and means["logps/rejected"] == -13.5


def test_at_initialisation_the_loss_is_ln2_and_accuracy_zero():
    same = torch.tensor([-7.0, -3.5])
    losses = dpo_pair_losses(same, same, same, same, torch.ones(2), torch.ones(2), BETA, "sigmoid")
    assert losses.mean().item() == pytest.approx(0.693147, abs=1e-6)
    metrics = preference_metrics(same, same, same, same, BETA)
    assert metrics["rewards/accuracies"][0].item() == 0  # strict: a tie is not a win


def test_label_smoothing_only_where_it_applies():
    assert DPOOptions(loss_type="robust", label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValidationError, match="label_smoothing applies"):
        DPOOptions(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValidationError):
        DPOOptions(label_smoothing=0.5)  # robust divides by 1 − 2ε
