"""ORPO's loss and metrics: hand-computed vectors, and TRL 1.16's ORPOTrainer on one batch.

The odds-ratio term is checked against an independent computation (odds = P/(1 − P) with
P = e^mean-logp, in the math module). On a tiny model, ``nll_on_prompt=True`` must give TRL's
loss, metrics and gradients (``ORPOTrainer.get_batch_loss_metrics`` run on TRL's own collated
batch), and the default must give an independent completion-only computation.
"""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

import align
from align_orpo import ORPOOptions, align_loss_counts
from align_orpo.batch import ODDS_MASK, prompt_nll_batch
from align_orpo.loss import log1m_exp, orpo_loss, orpo_metrics, orpo_pair_losses

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that trl.experimental is experimental
    from trl.experimental.orpo import ORPOTrainer
    from trl.experimental.utils import DPODataCollatorWithPadding

BETA = 0.1
CHOSEN, REJECTED = [-0.5, -1.2, -0.05, -2.0], [-0.9, -1.0, -0.3, -2.5]


def _odds(mean_logp):
    p = math.exp(mean_logp)
    return p / (1 - p)


def _independent_losses(chosen, rejected, beta):
    """−β·log σ(log OR) = β·log(1 + odds_l/odds_w), pair by pair."""
    return [beta * math.log1p(_odds(r) / _odds(c)) for c, r in zip(chosen, rejected, strict=True)]


def _tensors(requires_grad=False):
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=requires_grad)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=requires_grad)
    return chosen, rejected


# -- the loss math --------------------------------------------------------------------------------
def test_pair_losses_against_hand_computed_values():
    losses = orpo_pair_losses(*_tensors(), BETA)
    assert losses.tolist() == pytest.approx([0.036773, 0.085452, 0.013676, 0.045193], abs=1e-6)
    assert losses.mean().item() == pytest.approx(0.045273, abs=1e-6)
    assert losses.tolist() == pytest.approx(_independent_losses(CHOSEN, REJECTED, BETA), abs=1e-12)


def test_gradients_against_the_analytic_ones():
    """dL/dc = −β·σ(−z)/(1 − e^c), dL/dr = β·σ(−z)/(1 − e^r), z the log odds ratio."""
    chosen, rejected = _tensors(requires_grad=True)
    orpo_pair_losses(chosen, rejected, BETA).sum().backward()
    expected_chosen = [-0.078201, -0.082214, -0.262077, -0.042051]
    expected_rejected = [0.05185, 0.090887, 0.049315, 0.039612]
    assert chosen.grad.tolist() == pytest.approx(expected_chosen, abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx(expected_rejected, abs=1e-6)
    for c, r, grad_c, grad_r in zip(CHOSEN, REJECTED, chosen.grad, rejected.grad, strict=True):
        weight = BETA / (1 + _odds(c) / _odds(r))  # β·σ(−z)
        assert grad_c.item() == pytest.approx(-weight / (1 - math.exp(c)), rel=1e-9)
        assert grad_r.item() == pytest.approx(weight / (1 - math.exp(r)), rel=1e-9)


def test_equal_answers_give_beta_ln2_and_no_accuracy():
    same = torch.tensor([-1.5, -0.2])
    assert orpo_pair_losses(same, same, BETA).tolist() == pytest.approx([BETA * math.log(2)] * 2)
    metrics = orpo_metrics(same, same, BETA)
    assert metrics["rewards/accuracies"][0].item() == 0  # strict: a tie is not a win
    assert metrics["log_odds_chosen"][0].item() == 0


@pytest.mark.parametrize("x", [-80.0, -30.0, -5.0, -1.0, -math.log(2), -0.69, -0.1, -1e-3, -1e-6])
def test_log1m_exp_is_accurate_on_both_sides_of_minus_ln2(x):
    expected = math.log1p(-math.exp(x)) if x < -math.log(2) else math.log(-math.expm1(x))
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        got = log1m_exp(torch.tensor(x, dtype=dtype)).item()
        assert got == pytest.approx(expected, rel=rel), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_certain_answer_gives_a_finite_loss_and_gradient(dtype):
    """Mean log-prob exactly 0 (float32 rounds a near-certain answer to it): TRL's log1mexp
    gives −inf there and a NaN gradient; the clamp keeps both finite."""
    chosen = torch.tensor([0.0, -0.4, -1e-30], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-0.7, 0.0, -2.0], dtype=dtype, requires_grad=True)
    losses = orpo_pair_losses(chosen, rejected, BETA)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert losses[1] > losses[0]  # a certain rejected answer costs more than a certain chosen


def test_metrics_are_trl_s_pair_means():
    chosen, rejected = _tensors()
    metrics = orpo_metrics(chosen, rejected, BETA)
    means = {name: float(total) / count for name, (total, count) in metrics.items()}
    z = [math.log(_odds(c) / _odds(r)) for c, r in zip(CHOSEN, REJECTED, strict=True)]
    assert means["rewards/chosen"] == pytest.approx(BETA * sum(CHOSEN) / 4)
    assert means["rewards/rejected"] == pytest.approx(BETA * sum(REJECTED) / 4)
    assert means["rewards/accuracies"] == 0.75
    assert means["rewards/margins"] == pytest.approx(BETA * (sum(CHOSEN) - sum(REJECTED)) / 4)
    assert means["logps/chosen"] == pytest.approx(-0.9375)
    assert means["logps/rejected"] == pytest.approx(-1.175)
    assert means["log_odds_chosen"] == pytest.approx(sum(z) / 4)
    assert means["log_odds_chosen"] == pytest.approx(0.747697, abs=1e-6)
    assert means["log_odds_ratio"] == pytest.approx(-0.452735, abs=1e-6)
    assert means["log_odds_ratio"] == pytest.approx(-sum(math.log1p(math.exp(-v)) for v in z) / 4)


def test_options():
    assert ORPOOptions().beta == 0.1 and ORPOOptions().nll_on_prompt is False
    with pytest.raises(ValidationError):
        ORPOOptions(beta=0)
    with pytest.raises(ValidationError):
        ORPOOptions(alpha=1.0)


# -- on a model, against TRL ----------------------------------------------------------------------
PAD = 0
# (prompt, chosen completion, rejected completion) as token ids of the demo tokenizer: prompts
# start with BOS (1), completions end with EOS (2); lengths differ so that rows are padded.
PAIRS = [
    ([1, 45, 67, 89, 12], [101, 102, 2], [201, 2]),
    ([1, 33, 44], [150, 151, 152, 153, 2], [160, 161, 2]),
    ([1, 77, 78, 79, 80, 81, 82], [300, 2], [310, 311, 312, 313, 2]),
    ([1, 5, 6, 7, 8], [400, 401, 402, 2], [400, 403, 2]),
]
TRL_METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from align import demo

    path = tmp_path_factory.mktemp("orpo-model")
    demo.build_demo_model(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _examples():
    """align's tokenised preference examples: completion masks 1 on the completion."""
    examples = []
    for prompt, chosen, rejected in PAIRS:
        example = {}
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            example[f"{side}_input_ids"] = prompt + completion
            example[f"{side}_completion_mask"] = [0] * len(prompt) + [1] * len(completion)
        examples.append(example)
    return examples


def _trl_batch():
    """TRL's collated batch for the same pairs (``tokenize_row``'s keys, labels −100 on the
    prompt), padded by TRL's ``DPODataCollatorWithPadding``."""
    rows = []
    for prompt, chosen, rejected in PAIRS:
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            row[f"{side}_input_ids"] = prompt + completion
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(completion))
            row[f"{side}_labels"] = [-100] * len(prompt) + completion
        rows.append(row)
    return DPODataCollatorWithPadding(pad_token_id=PAD)(rows)


class _TRLTrainer:
    """The attributes ``ORPOTrainer.get_batch_loss_metrics`` reads, around TRL's own methods
    (the same figures as a real ORPOTrainer(ORPOConfig(beta=0.1)) on CPU in float32)."""

    is_encoder_decoder = False
    aux_loss_enabled = False
    padding_value = PAD
    beta = BETA
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    concatenated_inputs = staticmethod(ORPOTrainer.concatenated_inputs)
    get_batch_logps = staticmethod(ORPOTrainer.get_batch_logps)
    concatenated_forward = ORPOTrainer.concatenated_forward
    odds_ratio_loss = ORPOTrainer.odds_ratio_loss
    get_batch_loss_metrics = ORPOTrainer.get_batch_loss_metrics


def _total(output):
    """The core's multi-term loss for one micro-batch: Σ over terms of sum / count."""
    return sum(total / count for total, count in output.terms.values())


def _means(output):
    return {name: float(total) / float(count) for name, (total, count) in output.metrics.items()}


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_nll_on_prompt_equals_trl(model):
    model.zero_grad(set_to_none=True)
    trl_loss, trl_metrics = _TRLTrainer().get_batch_loss_metrics(model, _trl_batch())
    trl_loss.backward()
    trl_grads = _grads(model)

    batch = prompt_nll_batch(_examples(), PAD)
    output = orpo_loss(model, batch, BETA)
    loss = _total(output)
    loss.backward()
    grads = _grads(model)

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    means = _means(output)
    for name in TRL_METRICS:
        assert means[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert grads.keys() == trl_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, trl_grads[name], rtol=1e-4, atol=1e-6), name
    # the NLL counts every chosen token after the first, prompt and EOS included
    nll_tokens = sum(len(p) + len(c) - 1 for p, c, _ in PAIRS)
    assert float(output.terms["nll"][1]) == nll_tokens
    assert output.terms["odds_ratio"][1] == len(PAIRS)
    options = ORPOOptions(nll_on_prompt=True)
    assert align_loss_counts(batch, options) == {"nll": nll_tokens, "odds_ratio": len(PAIRS)}


def _completion_only_reference(model):
    """align's default, written out: token-mean NLL over chosen completion tokens (EOS
    included) plus β·mean of −log σ(log OR), each sequence scored on its own, unpadded."""
    means, nll, tokens = [], 0.0, 0
    sides = [(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS]
    with torch.no_grad():
        for row, (prompt, completion) in enumerate(sides):
            ids = torch.tensor([prompt + completion])
            logps = model(input_ids=ids).logits[0].double().log_softmax(-1)
            start = len(prompt)
            token_logps = [logps[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1])]
            means.append(sum(token_logps) / len(token_logps))
            if row < len(PAIRS):
                nll, tokens = nll - sum(token_logps), tokens + len(token_logps)
    n = len(PAIRS)
    odds = sum(_independent_losses(means[:n], means[n:], BETA)) / n
    return nll / tokens + odds, nll / tokens, tokens


def test_default_nll_on_completion_tokens_only(model):
    batch = align.paired_batch(_examples(), PAD)
    assert ODDS_MASK not in batch
    with torch.no_grad():
        output = orpo_loss(model, batch, BETA)
        trl_loss, trl_metrics = _TRLTrainer().get_batch_loss_metrics(model, _trl_batch())
    expected, nll, tokens = _completion_only_reference(model)
    assert _total(output).item() == pytest.approx(expected, abs=1e-5)
    assert _means(output)["nll_loss"] == pytest.approx(nll, abs=1e-5)
    assert float(output.terms["nll"][1]) == tokens == sum(len(c) for _, c, _ in PAIRS)
    assert align_loss_counts(batch, ORPOOptions()) == {"nll": tokens, "odds_ratio": len(PAIRS)}
    # only the NLL differs from TRL: the odds term and the pair metrics are TRL's
    odds_term = output.terms["odds_ratio"][0].item() / len(PAIRS)
    assert odds_term == pytest.approx(trl_loss.item() - trl_metrics["nll_loss"], abs=1e-5)
    means = _means(output)
    for name in TRL_METRICS:
        if name != "nll_loss":
            assert means[name] == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_prompt_nll_batch_masks():
    """Chosen rows train every real token; rejected rows and ``odds_mask`` keep completions."""
    examples = _examples()
    plain = align.paired_batch(examples, PAD)
    batch = prompt_nll_batch(examples, PAD)
    n = len(examples)
    assert torch.equal(batch["completion_mask"][:n], plain["attention_mask"][:n])
    assert torch.equal(batch["completion_mask"][n:], plain["completion_mask"][n:])
    assert torch.equal(batch[ODDS_MASK], plain["completion_mask"])
    assert torch.equal(batch["input_ids"], plain["input_ids"])


def test_extra_padding_columns_leave_the_odds_unchanged(model):
    """Padding appended to the core's masks but not to ``odds_mask`` changes nothing."""
    batch = prompt_nll_batch(_examples(), PAD)
    padded = dict(batch)
    for key, fill in (("input_ids", PAD), ("attention_mask", 0), ("completion_mask", 0)):
        extra = torch.full((batch[key].shape[0], 3), fill, dtype=batch[key].dtype)
        padded[key] = torch.cat([batch[key], extra], dim=1)
    with torch.no_grad():
        plain, more = orpo_loss(model, batch, BETA), orpo_loss(model, padded, BETA)
    assert _total(more).item() == pytest.approx(_total(plain).item(), abs=1e-6)
