import math

import pytest
import torch

from align.testing import ObjectiveConformance
from align_listwise.loss import listwise_loss, plackett_luce_losses


class TestListwise(ObjectiveConformance):
    objective = "listwise"  # on the ranked format's samples: groups of 2 and 3 answers


class TestListwiseRanks(ObjectiveConformance):
    objective = "listwise"
    options = {"beta": 0.5}
    records = [  # ranks (1 is best) instead of scores, a tie, lists of 2 to 4 answers
        {"prompt": "What is 1 + 2? ", "completions": ["3.", "No.", "4?"], "ranks": [1, 3, 2]},
        {"prompt": "What is 10 + 20? ", "completions": ["30.", "Thirty."], "ranks": [1, 1]},
        {
            "prompt": "What is 3 + 4? ",
            "completions": ["7.", "8.", "No.", "?"],
            "ranks": [1, 2, 2, 4],
        },
        {"prompt": "What is 7 + 30? ", "completions": ["No.", "37."], "ranks": [2, 1]},
    ]


def _log_sum_exp(*values):
    return math.log(sum(math.exp(v) for v in values))


def test_two_answers_are_dpo():
    """N = 2: −log σ(β(Δ_w − Δ_l)), whichever of the two the record lists first."""
    beta, delta_w, delta_l = 0.1, 1.5, -2.0
    dpo = math.log1p(math.exp(-beta * (delta_w - delta_l)))
    for rewards, scores in (([delta_w, delta_l], [1.0, 0.0]), ([delta_l, delta_w], [0.0, 1.0])):
        losses = plackett_luce_losses(
            beta * torch.tensor(rewards), torch.tensor(scores), torch.tensor([0, 0]), 1
        )
        assert losses.tolist() == pytest.approx([dpo], rel=1e-6)


def test_three_answers_and_a_tie_by_hand():
    """Group 0: three answers scored 1, 3, 2, so ranked (1), (2), (0). Group 1: a tie, ranked in
    record order. Group 2: four answers, the last two tied."""
    rewards = [0.5, -1.0, 2.0, 0.3, 0.7, 0.1, -0.2, 0.4, 1.1]
    scores = [1.0, 3.0, 2.0, 5.0, 5.0, 9.0, 1.0, 0.0, 0.0]
    group = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    expected = [
        -((-1.0 - _log_sum_exp(-1.0, 2.0, 0.5)) + (2.0 - _log_sum_exp(2.0, 0.5))),
        -(0.3 - _log_sum_exp(0.3, 0.7)),
        -(
            (0.1 - _log_sum_exp(0.1, -0.2, 0.4, 1.1))
            + (-0.2 - _log_sum_exp(-0.2, 0.4, 1.1))
            + (0.4 - _log_sum_exp(0.4, 1.1))
        ),
    ]
    r = torch.tensor(rewards, requires_grad=True)
    losses = plackett_luce_losses(r, torch.tensor(scores), torch.tensor(group), 3)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    losses.sum().backward()
    assert torch.isfinite(r.grad).all()  # the masked (−inf) entries give no NaN
    assert r.grad.sum().item() == pytest.approx(0.0, abs=1e-6)  # shifting all rewards: no change


def test_the_order_of_answers_in_a_record_does_not_matter():
    rewards, scores = torch.tensor([0.2, -0.4, 1.3, 0.0]), torch.tensor([3.0, 1.0, 4.0, 2.0])
    group = torch.zeros(4, dtype=torch.long)
    base = plackett_luce_losses(rewards, scores, group, 1)
    order = torch.tensor([2, 0, 3, 1])
    assert plackett_luce_losses(rewards[order], scores[order], group, 1).item() == pytest.approx(
        base.item(), rel=1e-6
    )


def test_the_loss_and_metrics_from_log_probs(monkeypatch):
    """forward_logps and the reference replaced by fixed sums: two groups (3 answers, 2)."""
    import align

    policy = torch.tensor([-4.0, -6.0, -5.0, -3.0, -2.0])
    ref = torch.tensor([-5.0, -5.0, -5.0, -2.0, -3.0])
    monkeypatch.setattr(
        align, "forward_logps", lambda model, batch: type("O", (), {"sums": policy})
    )
    reference = type("Ref", (), {"sequence_logps": staticmethod(lambda batch: ref)})
    batch = {
        "scores": torch.tensor([2.0, 0.0, 1.0, 1.0, 0.0]),
        "group": torch.tensor([0, 0, 0, 1, 1]),
    }
    output = listwise_loss(None, batch, reference, beta=0.5)
    r = [0.5, -0.5, 0.0, -0.5, 0.5]  # β(policy − ref); group 0 ranked (0), (2), (1)
    group0 = -((r[0] - _log_sum_exp(r[0], r[2], r[1])) + (r[2] - _log_sum_exp(r[2], r[1])))
    group1 = -(r[3] - _log_sum_exp(r[3], r[4]))
    assert output.loss.item() == pytest.approx(group0 + group1, rel=1e-6)
    assert output.count == 2
    metrics = {name: float(s) / c for name, (s, c) in output.metrics.items()}
    assert metrics["rewards/top"] == pytest.approx((r[0] + r[3]) / 2)
    assert metrics["rewards/bottom"] == pytest.approx((r[1] + r[4]) / 2)
    assert metrics["rewards/margins"] == pytest.approx((r[0] + r[3] - r[1] - r[4]) / 2)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)  # group 0's best wins, group 1's not
