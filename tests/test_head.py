"""Log-probs from the hidden states (``align.model.head``) equal the full-logits path: values
and every parameter's gradient, to 1e-5 in float32, for each head variant a real model has —
tied and untied, a bias, Gemma 2's final logit softcapping, Cohere's logit scale, Granite's
logits scaling, a PEFT ``modules_to_save`` head — in the padded and packed layouts, in chunks;
a head with a transform the module does not know falls back to the full logits, and says why.

The reference computation here is independent: the model's own ``.logits``, a float64
log-softmax and a gather, without any of ``align.model``'s code.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from align.data.packing import pack
from align.model import head as head_module
from align.model.attention import attention_bias
from align.model.head import hidden_target_logps, output_head, why_not_from_hidden
from align.model.logprobs import forward_logps

VOCAB = 97
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "attn_implementation": "sdpa",
}


def _llama(tied=True, bias=False):
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied))
    if bias:
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model


def _peft_head():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    return get_peft_model(_llama(tied=False), config)


MODELS = {
    "llama-tied": lambda: _llama(tied=True),
    "llama-untied": lambda: _llama(tied=False),
    "llama-head-bias": lambda: _llama(tied=False, bias=True),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "gemma2-softcap": lambda: Gemma2ForCausalLM(
        Gemma2Config(
            **{**SMALL, "attn_implementation": "eager"},
            head_dim=8,
            final_logit_softcapping=2.0,  # small, so the cap bends these logits
            sliding_window=64,
        )
    ),
    "cohere-logit-scale": lambda: CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.37)),
    "granite-logits-scaling": lambda: GraniteForCausalLM(
        GraniteConfig(**SMALL, logits_scaling=3.0)
    ),
    "peft-modules-to-save": _peft_head,
}


def _model(name):
    torch.manual_seed(0)
    model = MODELS[name]().float()
    with torch.no_grad():  # weights large enough that the logits are far from uniform
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dim() == 2:
                parameter.mul_(3)
    return model.train()


def _batches():
    """Two groups: a pair sharing a prompt, a single sequence; padded and packed."""
    rng = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, VOCAB, (6,), generator=rng).tolist()
    chosen = prompt + torch.randint(3, VOCAB, (5,), generator=rng).tolist()
    rejected = prompt + torch.randint(3, VOCAB, (3,), generator=rng).tolist()
    single = torch.randint(3, VOCAB, (9,), generator=rng).tolist()
    groups = [
        [(chosen, [0] * 6 + [1] * 5), (rejected, [0] * 6 + [1] * 3)],
        [(single, [0] * 4 + [1] * 5)],
    ]
    rows = [seq for group in groups for seq in group]
    width = max(len(ids) for ids, _ in rows)
    padded = {
        "input_ids": torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]
        ),
        "completion_mask": torch.tensor([m + [0] * (width - len(m)) for _, m in rows]),
    }
    return {"padded": padded, "packed": pack(groups, 0)}, rows


def _reference_sums(model, rows):
    """Σ log p over each sequence's trained tokens, from the model's own logits, float64, each
    sequence in its own forward."""
    sums = []
    for ids, mask in rows:
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])
        sums.append((logp[:, 0] * torch.tensor(mask[1:], dtype=torch.float64)).sum())
    return torch.stack(sums)


def _gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hidden_state_log_probs_equal_the_full_logits(name, layout, monkeypatch):
    monkeypatch.setattr(head_module, "CHUNK_ELEMENTS", 4 * VOCAB)  # chunks of 4 rows
    model = _model(name)
    assert why_not_from_hidden(model) is None
    head = output_head(model)
    assert not isinstance(head, str)
    batches, rows = _batches()
    weights = torch.tensor([0.7, -1.3, 0.4])
    expected = _reference_sums(model, rows)
    want = _gradients(model, (expected * weights.double()).sum())

    seen = []
    hook = head.module.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    out = forward_logps(model, batches[layout])
    hook.remove()
    assert seen == [] or all(shape[-1] == 0 for shape in seen)  # no logits were made
    got = _gradients(model, (out.sums * weights).sum())
    assert torch.allclose(out.sums.double(), expected, atol=1e-5, rtol=0)
    assert want.keys() == got.keys() and want
    for key in want:
        assert torch.allclose(got[key], want[key].float(), atol=1e-5, rtol=1e-4), key


def test_the_known_transforms_are_read_from_the_config():
    assert output_head(_model("gemma2-softcap")).softcap == 2.0
    assert output_head(_model("cohere-logit-scale")).scale == pytest.approx(0.37)
    assert output_head(_model("granite-logits-scaling")).scale == pytest.approx(1 / 3)
    plain = output_head(_model("llama-tied"))
    assert (plain.scale, plain.softcap) == (None, None)


def test_temperature_predictions_and_entropy_match_the_logits():
    model = _model("gemma2-softcap")
    batches, _ = _batches()
    batch = batches["packed"]
    out = forward_logps(model, batch, temperature=0.7, entropy=True)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=attention_bias(batch["attention_mask"], model),  # eager: additive
            position_ids=batch["position_ids"],
        ).logits.double()
        logp = torch.log_softmax(logits / 0.7, -1)
    mask = batch["target_mask"]
    expected = logp.gather(-1, batch["targets"][..., None])[..., 0] * mask
    assert torch.allclose(out.logps.double(), expected, atol=1e-5)
    entropy = -(logp.exp() * logp).sum(-1) * mask
    assert torch.allclose(out.entropy.double(), entropy, atol=1e-5)
    argmax = logits.argmax(-1).masked_fill(~mask, -1)
    assert torch.equal(out.predictions, argmax)
    assert out.entropy.requires_grad is False
    # .logits are still there on demand: the full, tempered logits
    assert torch.allclose(out.logits.double(), logits / 0.7, atol=1e-4)


def test_an_unknown_transform_after_the_head_falls_back_and_says_why():
    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 2
            return output

    torch.manual_seed(0)
    model = Doubled(LlamaConfig(**SMALL))
    reason = why_not_from_hidden(model, "policy")
    assert "policy's head is not understood" in reason
    assert "not the output head's" in reason
    assert isinstance(output_head(model), str)  # the verdict is remembered
    batches, rows = _batches()
    out = forward_logps(model, batches["padded"])
    expected = _reference_sums(model, rows)
    assert torch.allclose(out.sums.double(), expected, atol=1e-5)
    assert out.logits.shape[-1] == VOCAB  # the full-logits path


def test_lora_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batches, rows = _batches()
    want = _gradients(model, _reference_sums(model, rows).sum())
    got = _gradients(model, forward_logps(model, batches["packed"]).sums.sum())
    assert want.keys() == got.keys() and all("lora" in k for k in got)
    for key in want:
        assert torch.allclose(got[key], want[key].float(), atol=1e-5, rtol=1e-4), key


def test_bf16_autocast_is_close_to_the_logits_path():
    """Under bf16 autocast the head's matmul runs in bf16, as the model's own would."""
    model = _model("llama-untied")
    batches, rows = _batches()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward_logps(model, batches["padded"])
        logits = model(**{k: batches["padded"][k] for k in ("input_ids", "attention_mask")})
    logits = logits.logits.float()
    ids, mask = batches["padded"]["input_ids"], batches["padded"]["completion_mask"]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    expected = (logp * mask[:, 1:]).sum(-1)
    assert torch.allclose(out.sums, expected, atol=0.05 * expected.abs().max().item())


def test_chunked_rows_equal_one_chunk_and_empty_rows_backward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 50, bias=True)
    hidden = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    results = []
    for chunk in (3, None):
        out = hidden_target_logps(hidden, targets, linear, softcap=3.0, chunk_rows=chunk)
        grads = torch.autograd.grad(out.logps.sum(), [hidden, linear.weight, linear.bias])
        results.append((out.logps, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    empty = hidden_target_logps(hidden[:0], targets[:0], linear)
    empty.logps.sum().backward()
    assert hidden.grad is not None and not hidden.grad.any()
