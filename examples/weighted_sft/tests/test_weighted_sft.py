import json

import pytest
import torch
from click.testing import CliRunner

import align_weighted_sft
from align.cli import cli
from align.testing import ObjectiveConformance, registered

RECORDS = [
    {"prompt": "What is 1 + 2? ", "completion": "3.", "weight": 2.5},
    {"prompt": "What is 10 + 20? ", "completion": "10 + 20 = 30. ok"},  # weight 1.0
    {"prompt": "What is 3 + 4? ", "completion": "No idea.", "weight": 0},
    {"prompt": "What is 7 + 30? ", "completion": "7 + 30 = 37.", "weight": 0.5},
]


class TestWeightedSFT(ObjectiveConformance):
    objective = "weighted-sft"
    records = RECORDS


def test_loss_by_hand(monkeypatch):
    """forward_logps replaced by fixed per-sequence sums: Σ_i w_i·(−sum_i) / Σ_i tokens_i."""
    import align

    fixed = type(
        "Out", (), {"sums": torch.tensor([-4.0, -9.0, -1.0]), "num_tokens": torch.tensor([2, 3, 1])}
    )
    monkeypatch.setattr(align, "forward_logps", lambda model, batch: fixed)
    batch = {"weight": torch.tensor([2.0, 0.0, 0.5])}
    output = align_weighted_sft.align_compute_loss(None, batch)
    assert output.loss.item() == pytest.approx(2.0 * 4.0 + 0.0 * 9.0 + 0.5 * 1.0)
    assert output.count.item() == 6


def test_a_negative_weight_is_an_error_naming_the_line(tmp_path):
    from align import demo

    demo.build_demo_model(tmp_path / "model")
    rows = [RECORDS[0], {**RECORDS[1], "weight": -1}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with registered(align_weighted_sft, only=True):
        result = CliRunner().invoke(
            cli,
            [
                "inspect",
                "--objective",
                "weighted-sft",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(data),
            ],
        )
    assert result.exit_code == 1, result.output
    assert "train.jsonl, line 2, field 'weight'" in result.output
