"""The reference at the sampling temperature: ``Reference.sequence_logps(batch, prefix,
temperature)`` scores ``logits / temperature`` as ``align.forward_logps`` scores the policy, so
an on-policy objective's KL to a reference equal to the policy is exactly 0 at step 0 at any
temperature (an RLOO author's was 0.167 at 0.7, the reference being scored at 1)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import align
from align.data.batching import sequence_batch
from align.data.packing import pack, sequence_digest
from align.model.logprobs import forward_logps
from align.reference.models import AdapterReference, ModelReference
from align.reference.precompute import PrecomputedReference

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def rows(tokenizer):
    out = []
    for prompt, answer in [("What is 1 + 2? ", "3."), ("Hi ", "Hello there."), ("2 + 2", " = 4")]:
        ids = tokenizer(prompt + answer)["input_ids"]
        cut = len(tokenizer(prompt)["input_ids"])
        out.append({"input_ids": ids, "completion_mask": [0] * cut + [1] * (len(ids) - cut)})
    return out


def _layouts(rows, pad_token_id):
    padded = sequence_batch(rows, pad_token_id)
    packed = pack([[(r["input_ids"], r["completion_mask"])] for r in rows], pad_token_id)
    return {"padded": padded, "packed": packed}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_model_reference_equal_to_the_policy_gives_a_kl_of_0_at_any_temperature(
    model_dir, tokenizer, rows, layout
):
    batch = _layouts(rows, tokenizer.pad_token_id)[layout]
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = ModelReference.frozen_copy(policy)
    with torch.no_grad():
        sampled = forward_logps(policy, batch, temperature=TEMPERATURE).sums
        plain = forward_logps(policy, batch).sums
    scored = reference.sequence_logps(batch, temperature=TEMPERATURE)
    assert scored.dtype == torch.float32
    kl = sampled - scored  # the sequence-level KL estimate of RLOO or online RL at step 0
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6), kl
    assert not torch.allclose(scored, plain, atol=1e-2)  # the temperature is not ignored
    assert torch.allclose(reference.sequence_logps(batch), plain, atol=1e-6)  # 1 by default
    assert torch.allclose(reference.sequence_logps(batch, temperature=0), plain, atol=1e-6)
    tokens = reference.token_logps(batch, temperature=TEMPERATURE)  # and the two agree
    assert torch.allclose(forward_logps(policy, batch).per_sequence(tokens), scored, atol=1e-5)


def test_the_adapter_reference_scores_at_the_temperature_too(model_dir, tokenizer, rows):
    from peft import LoraConfig, get_peft_model

    batch = _layouts(rows, tokenizer.pad_token_id)["padded"]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        expected = forward_logps(base, batch, temperature=TEMPERATURE).sums
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    adapter = AdapterReference(policy)
    assert torch.allclose(
        adapter.sequence_logps(batch, temperature=TEMPERATURE), expected, atol=1e-5
    )
    assert not torch.allclose(adapter.sequence_logps(batch), expected, atol=1e-2)


def test_a_precomputed_reference_holds_temperature_1_only(tokenizer, rows):
    table = {sequence_digest(r["input_ids"], r["completion_mask"]): -1.5 for r in rows}
    reference = PrecomputedReference(table)
    batch = _layouts(rows, tokenizer.pad_token_id)["padded"]
    assert reference.sequence_logps(batch).tolist() == [-1.5] * len(rows)
    assert reference.sequence_logps(batch, temperature=1.0).tolist() == [-1.5] * len(rows)
    with pytest.raises(align.PluginError, match="temperature 1 only.*--reference model or adapter"):
        reference.sequence_logps(batch, temperature=TEMPERATURE)
