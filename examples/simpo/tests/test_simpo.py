import math

import torch

from align.testing import ObjectiveConformance
from align_simpo.loss import simpo_loss


class TestSimPO(ObjectiveConformance):
    objective = "simpo"


def test_loss_by_hand(monkeypatch):
    """forward_logps replaced by fixed per-sequence sums: [chosen; rejected]."""
    import align

    fixed = type(
        "Out", (), {"sums": torch.tensor([-4.0, -9.0]), "num_tokens": torch.tensor([2.0, 3.0])}
    )
    monkeypatch.setattr(align, "forward_logps", lambda model, batch: fixed)
    output = simpo_loss(None, {}, beta=2.0, gamma=0.5)
    margin = 2.0 * (-4.0 / 2) - 2.0 * (-9.0 / 3) - 0.5  # −4 + 6 − 0.5
    assert abs(output.loss.item() - math.log1p(math.exp(-margin))) < 1e-6
