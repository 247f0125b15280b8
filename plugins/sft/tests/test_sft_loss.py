"""SFT loss (shared/objectives.md §1) against an independent cross-entropy computation."""

import pytest
import torch
import torch.nn.functional as F

import align
from align_sft.loss import sft_loss


class FixedLogits(torch.nn.Module):
    """A 'model' that returns given logits, so the loss sees known numbers."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask, use_cache=False):
        return type("Out", (), {"logits": self.logits})()


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (3, 7))
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0],  # 4 completion tokens, then padding
            [0, 1, 1, 0, 0, 0, 0],  # 2
            [0, 0, 0, 1, 1, 1, 1],
        ]
    )  # 4
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask}


def _reference_per_token(logits, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        reduction="none",
        ignore_index=-100,
    ).view(labels.shape), labels != -100


def test_token_normalisation_matches_cross_entropy():
    batch = _batch()
    model = FixedLogits(torch.randn(3, 7, 11))
    out = sft_loss(model, batch, "token")
    nll, valid = _reference_per_token(model.logits.detach(), batch)
    assert out.count.item() == 10
    assert (out.loss / out.count).item() == pytest.approx(
        (nll.sum() / valid.sum()).item(), abs=1e-6
    )


def test_sequence_normalisation_matches_mean_of_means():
    batch = _batch()
    model = FixedLogits(torch.randn(3, 7, 11))
    out = sft_loss(model, batch, "sequence")
    nll, valid = _reference_per_token(model.logits.detach(), batch)
    per_seq = nll.sum(-1) / valid.sum(-1)
    assert out.count.item() == 3
    assert (out.loss / out.count).item() == pytest.approx(per_seq.mean().item(), abs=1e-6)
    # The two normalisations differ when completion lengths differ.
    token = sft_loss(model, batch, "token")
    assert abs((token.loss / token.count).item() - per_seq.mean().item()) > 1e-4


def test_normalisations_agree_for_equal_lengths():
    batch = _batch()
    batch["completion_mask"] = torch.tensor([[0, 0, 1, 1, 1, 0, 0]] * 3)
    model = FixedLogits(torch.randn(3, 7, 11))
    token, seq = sft_loss(model, batch, "token"), sft_loss(model, batch, "sequence")
    assert (token.loss / token.count).item() == pytest.approx(
        (seq.loss / seq.count).item(), abs=1e-6
    )


def test_token_accuracy_counts_only_completion_tokens():
    batch = _batch()
    logits = torch.full((3, 7, 11), -10.0)
    # Predict every target correctly except row 0's first completion token.
    targets = batch["input_ids"][:, 1:]
    logits[:, :-1].scatter_(-1, targets.unsqueeze(-1), 10.0)
    logits[0, 1] = -10.0
    logits[0, 1, (targets[0, 1] + 1) % 11] = 10.0
    out = sft_loss(FixedLogits(logits), batch, "token")
    correct, total = out.metrics["mean_token_accuracy"]
    assert (correct.item(), total.item()) == (9, 10)


def test_plugin_registers_sft_with_options():
    from align.plugins import load_plugins

    registry = load_plugins()
    sft = registry.objective("sft").item
    assert isinstance(sft, align.Objective)
    assert sft.shapes == ("prompt_completion", "conversation") and not sft.needs_reference
    assert sft.options().normalization == "token"
    with pytest.raises(ValueError):
        sft.options(normalization="tokens")
