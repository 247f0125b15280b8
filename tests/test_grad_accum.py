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
from align.plugins.hooks import ObjectiveHooks
from align.reference import ModelReference


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


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_scaling_before_backward_gives_the_old_gradient(model_dir, tokenizer, sft_rows, objective):
    """The step scales each micro-batch's loss by its term's total before the backward; the loop
    used to backward the sums and scale the summed gradients by 1/Σcount afterwards. The two
    give the same loss and gradients, to 1e-6."""
    registry = load_plugins()
    spec = resolve(registry, None, {"objective": objective}, [])
    hooks = ObjectiveHooks(registry, spec, tokenizer)
    rows = (
        sft_rows
        if objective == "sft"
        else [
            {"prompt": r["prompt"], "chosen": r["completion"], "rejected": "No."} for r in sft_rows
        ]
    )
    records = [Record(r, "mem", f"record {i}") for i, r in enumerate(rows)]
    examples, _ = tokenize_records(records, hooks.data_format, tokenizer, 64, "error", "train")
    micro = [examples[:3], examples[3:]]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = ModelReference.frozen_copy(model) if objective == "dpo" else None

    def compute(batch):
        return hooks.compute(model, batch, reference, None)

    batches = [hooks.build_batch(m) for m in micro]
    loss = accumulate_gradients(
        model,
        [(b, hooks.counts(b, m)) for b, m in zip(batches, micro, strict=True)],
        compute,
        Accelerator(cpu=True),
        MetricSums(),
    )
    new = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total_loss, total_count = 0.0, 0.0
    for batch in batches:  # the old way
        output, _ = compute(batch)
        output.loss.backward()
        total_loss += float(output.loss)
        total_count += float(torch.as_tensor(output.count).sum())
    assert loss == pytest.approx(total_loss / total_count, abs=1e-6)
    for name, param in model.named_parameters():
        if param.grad is not None:
            old = param.grad / total_count
            assert torch.allclose(new[name], old, atol=1e-6, rtol=1e-5), name
