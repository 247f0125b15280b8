"""Gradient accumulation equals one large batch: same logged loss, same accumulated grads."""

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from align import default_batch
from align.config import resolve
from align.data.examples import tokenize_records
from align.data.records import Record
from align.loop.metrics import MetricSums
from align.loop.step import accumulate_gradients
from align.plugins import load_plugins


def _examples(tokenizer, sft_rows):
    records = [Record(r, "mem", f"record {i}") for i, r in enumerate(sft_rows)]
    examples, _ = tokenize_records(records, "prompt_completion", tokenizer, 64, "error", "train")
    return examples


def _grads(model_dir, tokenizer, micro, normalization):
    registry = load_plugins()
    spec = resolve(registry, sets=[f"normalization={normalization}"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    accelerator = Accelerator(cpu=True)

    def compute(batch):
        out = registry.call_objective_hook(
            "align_compute_loss",
            spec.objective,
            objective=spec.objective.item,
            model=model,
            batch=batch,
            options=spec.options,
            reference=None,
            run=None,
        )
        return out, {}

    from align_sft.loss import sft_counts

    batches = [default_batch("prompt_completion", m, tokenizer.pad_token_id) for m in micro]
    counted = [(b, sft_counts(b, normalization)) for b in batches]
    sums = MetricSums()
    loss = accumulate_gradients(model, counted, compute, accelerator, sums)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads, sums.reduce()


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_two_micro_batches_equal_one_batch(model_dir, tokenizer, sft_rows, normalization):
    examples = _examples(tokenizer, sft_rows)
    first, second = examples[:3], examples[3:]  # uneven: a mean of means would differ
    n_first = sum(sum(e["completion_mask"][1:]) for e in first)
    n_second = sum(sum(e["completion_mask"][1:]) for e in second)
    assert n_first != n_second  # different token counts make the test meaningful

    loss_one, grads_one, logged_one = _grads(model_dir, tokenizer, [examples], normalization)
    loss_two, grads_two, logged_two = _grads(model_dir, tokenizer, [first, second], normalization)

    assert loss_two == pytest.approx(loss_one, abs=1e-5)
    assert logged_two["loss"] == pytest.approx(logged_one["loss"], abs=1e-5)
    assert logged_one["loss"] == pytest.approx(loss_one, abs=1e-6)
    assert grads_one.keys() == grads_two.keys() and grads_one
    for name, grad in grads_one.items():
        assert torch.allclose(grads_two[name], grad, atol=1e-5, rtol=0), name


def test_naive_mean_of_micro_means_would_differ(model_dir, tokenizer, sft_rows):
    """The test above can fail: averaging per-micro-batch token means gives another loss."""
    examples = _examples(tokenizer, sft_rows)
    loss_one, _, _ = _grads(model_dir, tokenizer, [examples], "token")
    loss_a, _, _ = _grads(model_dir, tokenizer, [examples[:4]], "token")
    loss_b, _, _ = _grads(model_dir, tokenizer, [examples[4:]], "token")
    assert abs((loss_a + loss_b) / 2 - loss_one) > 1e-4
