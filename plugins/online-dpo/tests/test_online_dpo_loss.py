"""The online DPO loss and metrics against an independent computation: every sequence run on
its own through the policy and the reference, the DPO formulas written out with ``math``, on the
rollout batches the core builds, padded and packed."""

import math

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

import align
from align.reference import ModelReference
from align.rollout.batch import add_rewards, rollout_batch
from align_online_dpo import OnlineDPOOptions, align_compute_loss, align_prepare_rollouts

BETA = 0.1
PROMPTS = [[1, 5, 9, 3], [1, 7, 2], [1, 4, 4, 8, 6]]  # different lengths: padding in the batch
COMPLETIONS = [[10, 11, 2], [12, 2], [13, 14, 15, 16], [17, 2], [18, 19, 2], [20, 21, 22]]
TRUNCATED = [False, False, True, False, False, True]
REWARDS = [0.0, 1.0, 1.0, 0.5, 0.0, 0.0]  # prompt 0: second; 1: first; 2: a tie (first)
EOS = 2


def _model(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the init's: log-probs far from uniform
        for p in model.parameters():
            p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def models():
    return _model(0), _model(1)


def _batch(packed, missing_eos_penalty=None):
    examples = [{"prompt_input_ids": p} for p in PROMPTS]
    batch = rollout_batch(examples, COMPLETIONS, 2, 0, packed, TRUNCATED)
    add_rewards(batch, ["r"], [1.0], [REWARDS])
    options = OnlineDPOOptions(beta=BETA, missing_eos_penalty=missing_eos_penalty)
    return align_prepare_rollouts(batches=[batch], options=options)[0]


def _sequence_logp(model, prompt, completion):
    """log π(completion | prompt): the sequence alone, float64 log-softmax."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].double()
    logps = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return logps[len(prompt) - 1 :].sum()


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def _independent(models, loss_type, missing_eos_penalty=None):
    """The loss summed over pairs (a torch scalar, for its gradient), the number of pairs, and
    the metrics' means, each sequence computed on its own."""
    policy, ref = models
    penalty = missing_eos_penalty or 0.0
    score = [r - penalty * t for r, t in zip(REWARDS, TRUNCATED, strict=True)]
    logp = [_sequence_logp(policy, PROMPTS[i // 2], c) for i, c in enumerate(COMPLETIONS)]
    with torch.no_grad():
        ref_logp = [
            _sequence_logp(ref, PROMPTS[i // 2], c).item() for i, c in enumerate(COMPLETIONS)
        ]
    losses, pairs = [], []
    for first in range(0, len(COMPLETIONS), 2):
        w, lo = (first, first + 1) if score[first] >= score[first + 1] else (first + 1, first)
        dw, dl = logp[w] - ref_logp[w], logp[lo] - ref_logp[lo]
        z = BETA * (dw - dl)
        if loss_type == "sigmoid":
            loss = torch.log1p(torch.exp(-z))  # −logσ(z)
        elif loss_type == "ipo":  # TRL's OnlineDPOTrainer: on sums
            loss = (dw - dl - 1 / (2 * BETA)) ** 2
        elif loss_type == "hinge":
            loss = torch.relu(1 - z)
        else:  # minor
            loss = torch.log1p(torch.exp(-BETA * (dw - torch.clamp(dl, min=0))))
        losses.append(loss)
        pairs.append((w, lo, dw.item(), dl.item()))
    p = [x.item() for x in logp]
    kl = [a - b for a, b in zip(p, ref_logp, strict=True)]
    means = {
        "rewards/chosen": _mean(BETA * dw for _, _, dw, _ in pairs),
        "rewards/rejected": _mean(BETA * dl for _, _, _, dl in pairs),
        "rewards/margins": _mean(BETA * (dw - dl) for _, _, dw, dl in pairs),
        "rewards/accuracies": _mean(dw > dl for _, _, dw, dl in pairs),
        "logps/chosen": _mean(p[w] for w, _, _, _ in pairs),
        "logps/rejected": _mean(p[lo] for _, lo, _, _ in pairs),
        "objective/scores_margin": _mean(score[w] - score[lo] for w, lo, _, _ in pairs),
        "objective/scores": _mean(score),
        "objective/kl": _mean(kl),
        "objective/entropy": _mean(-x for x in p),
        "objective/non_score_reward": _mean(-BETA * k for k in kl),
        "objective/rlhf_reward": _mean(s - BETA * k for s, k in zip(score, kl, strict=True)),
        "val/contain_eos_token": _mean(not t for t in TRUNCATED),
        "beta": BETA,
    }
    return torch.stack(losses).sum(), len(pairs), means


def _ours(models, packed, loss_type, missing_eos_penalty=None):
    policy, ref = models
    options = OnlineDPOOptions(
        beta=BETA, loss_type=loss_type, missing_eos_penalty=missing_eos_penalty
    )
    batch = _batch(packed, missing_eos_penalty)
    return align_compute_loss(
        model=policy, batch=batch, options=options, reference=ModelReference(ref)
    ), batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "minor"])
@pytest.mark.parametrize("penalty", [None, 1.0])
def test_loss_metrics_and_gradient_equal_the_independent_computation(models, loss_type, penalty):
    policy, _ = models
    policy.zero_grad(set_to_none=True)
    want, pairs, means = _independent(models, loss_type, penalty)
    want.backward()
    want_grads = _grads(policy)
    for packed in (False, True):
        policy.zero_grad(set_to_none=True)
        output, batch = _ours(models, packed, loss_type, penalty)
        assert isinstance(output, align.LossOutput)
        assert output.count == pairs == 3
        assert output.loss.item() == pytest.approx(want.item(), abs=1e-5, rel=1e-6), packed
        output.loss.backward()
        grads = _grads(policy)
        assert grads.keys() == want_grads.keys()
        for name, grad in grads.items():
            want_grad = want_grads[name].to(grad.dtype)
            scale = max(1.0, want_grad.abs().max().item())  # ipo's gradients reach 1e2
            assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-5 * scale), name
        got = {k: float(s) / float(c) for k, (s, c) in output.metrics.items()}
        assert got.keys() == means.keys()
        for name, value in means.items():
            assert got[name] == pytest.approx(value, abs=1e-5), (name, packed)


def test_pairs_are_chosen_by_reward_ties_to_the_first(models):
    batch = _batch(packed=False)
    assert batch["chosen_rows"].tolist() == [1, 2, 4]
    assert batch["rejected_rows"].tolist() == [0, 3, 5]
    # prompt 1: its first sample is truncated, 1 − 1 < 0.5; prompt 2: the tie at 0 (the first
    # sample without a penalty) is broken by the second's missing EOS
    penalised = _batch(packed=True, missing_eos_penalty=1.0)
    assert penalised["chosen_rows"].tolist() == [1, 3, 4]
    assert penalised["scores"].tolist() == [0.0, 1.0, 0.0, 0.5, 0.0, -1.0]


def test_a_batch_the_round_hook_did_not_see_is_paired_by_the_loss(models):
    policy, ref = models
    examples = [{"prompt_input_ids": p} for p in PROMPTS]
    raw = rollout_batch(examples, COMPLETIONS, 2, 0, False, TRUNCATED)
    add_rewards(raw, ["r"], [1.0], [REWARDS])
    options = OnlineDPOOptions(beta=BETA)
    with torch.no_grad():
        direct = align_compute_loss(
            model=policy, batch=raw, options=options, reference=ModelReference(ref)
        )
        prepared, _ = _ours(models, False, "sigmoid")
    assert direct.loss.item() == pytest.approx(prepared.loss.item(), abs=1e-6)


def test_at_the_start_the_loss_is_ln2(models):
    policy, _ = models
    options = OnlineDPOOptions()
    with torch.no_grad():
        output = align_compute_loss(
            model=policy,
            batch=_batch(packed=True),
            options=options,
            reference=ModelReference(_model(0)),
        )
    assert output.loss.item() / output.count == pytest.approx(math.log(2), abs=1e-6)
    assert float(output.metrics["objective/kl"][0]) == pytest.approx(0.0, abs=1e-5)
    assert float(output.metrics["rewards/accuracies"][0]) == 0


def test_options_follow_trl():
    options = OnlineDPOOptions()
    assert (options.beta, options.loss_type, options.missing_eos_penalty) == (0.1, "sigmoid", None)
    with pytest.raises(ValidationError):
        OnlineDPOOptions(loss_type="robust")
    with pytest.raises(ValidationError):
        OnlineDPOOptions(label_smoothing=0.1)  # TRL's OnlineDPOTrainer has none
    with pytest.raises(ValidationError):
        OnlineDPOOptions(missing_eos_penalty=-1.0)
    with pytest.raises(ValidationError):
        OnlineDPOOptions(beta=0)
