"""Vector T0 (shared/objectives.md §0): shifted per-token log-probs over completion tokens."""

import pytest
import torch

from align.model.logprobs import token_logps

LOGITS = torch.tensor([[[0.0, 1, 0], [2, 0, -1], [0.5, 0.5, 0.5], [3, -3, 0]]])
IDS = torch.tensor([[1, 2, 0, 2]])
MASK = torch.tensor([[0, 0, 1, 1]])


def test_vector_t0_shifted_logps():
    logps, mask = token_logps(LOGITS, IDS, MASK)
    expected_all = torch.tensor([-1.551445, -0.169846, -1.098612])
    full, _ = token_logps(LOGITS, IDS, torch.ones_like(MASK))
    assert torch.allclose(full[0], expected_all, atol=1e-5)
    assert mask.tolist() == [[0, 1, 1]]
    assert logps.sum().item() == pytest.approx(-1.268458, abs=1e-5)
    assert (logps.sum() / mask.sum()).item() == pytest.approx(-0.634229, abs=1e-5)


def test_unshifted_gather_differs():
    """The bug the shift prevents: gathering each position's own token gives −4.149558."""
    unshifted = torch.log_softmax(LOGITS, -1).gather(-1, IDS.unsqueeze(-1)).squeeze(-1)
    assert (unshifted * MASK).sum().item() == pytest.approx(-4.149558, abs=1e-5)
    logps, _ = token_logps(LOGITS, IDS, MASK)
    assert abs(logps.sum().item() - (-4.149558)) > 1


def test_float32_for_half_logits():
    logps, _ = token_logps(LOGITS.to(torch.bfloat16), IDS, MASK)
    assert logps.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_log_probs_and_gradients_equal_a_full_log_softmax(monkeypatch, dtype):
    """Chunks of 3 positions: the same values and gradients as the naive full log-softmax."""
    from align.model import logprobs

    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * 50)
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 50).to(dtype).requires_grad_()
    ids = torch.randint(0, 50, (3, 9))
    mask = (torch.rand(3, 9) > 0.3).long()
    weights = torch.randn(3, 8)
    logps, _ = token_logps(logits, ids, mask)
    (logps * weights).sum().backward()
    chunked = logits.grad.clone()
    logits.grad = None
    naive = torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    naive = naive * mask[:, 1:]
    (naive * weights).sum().backward()
    assert torch.allclose(logps, naive, atol=1e-5, rtol=0)
    assert torch.allclose(chunked.float(), logits.grad.float(), atol=1e-5, rtol=0)
    assert chunked.dtype == dtype


def test_entropy_in_chunks_equals_the_full_computation(monkeypatch):
    """The full-logits path's entropy (GRPO's metric), chunked: equal to the naive one."""
    from align.model import logprobs

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7) * 3
    mask = torch.rand(3, 5) > 0.4
    p = torch.softmax(logits, -1)
    expected = -(p * p.log()).sum(-1) * mask
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 14)  # two positions per chunk
    assert torch.allclose(logprobs.entropy_at(logits, mask), expected, atol=1e-5)
    assert not logprobs.entropy_at(logits, torch.zeros(3, 5)).any()
