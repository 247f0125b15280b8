"""RLOO against TRL 1.16's RLOOTrainer on the same fixed rollouts.

TRL's generation is replaced by fixed completions (some ending in EOS, some truncated at
``max_completion_length``); ``RLOOTrainer._generate_and_score_completions`` tokenises the
prompts, scores the completions with a deterministic reward, computes the old policy's and (β >
0) the reference's log-probs, the KL-penalised rewards and the leave-one-out advantages, and
``compute_loss`` gives TRL's loss and metrics. align's rollout batch is built from TRL's own
prompt ids and the same completions (``align.rollout.batch``), in the padded and the packed
layout, and the plugin's hooks must give the same advantages, loss, gradients and metrics.

The policy starts away from the reference (its weights are perturbed once, before TRL loads the
reference from the saved directory), so the KL is not 0; with ``num_iterations > 1`` the policy
is perturbed again between sampling and the loss, so the sequence ratio to the old policy leaves
the clip range on some completions.

Accumulation: TRL averages the loss of each micro-batch (``per_sequence_loss.mean()``) and
divides by the accumulation steps; align sums over completions and the core divides by the
step's count. With equal micro-batches (TRL's) the two are the same, which the test checks
live: TRL's loss over two micro-batches of 6 completions equals align's step over micro-batches
of 2 prompts and 1 prompt (8 and 4 completions), which equals one large batch, in loss and
gradient.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from align.demo import build_demo_model
from align.loop.metrics import MetricSums
from align.plugins.testing import _OneProcess
from align.reference.models import ModelReference
from align.rollout.batch import add_rewards, rollout_batch
from align_rloo import RLOOOptions, align_compute_loss, align_loss_counts, align_prepare_rollouts

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations

K = 4
MAX_LEN = 6
EOS = 2
PROMPTS = ["What is 7 + 12?", "Say hi", "What is 3 + 4? Answer:"]
COMPLETIONS = [
    # prompt 0: mixed rewards, one truncated
    [40, 50, EOS],
    [60, EOS],
    [70, 80, 90, 100, 110, 120],
    [33, 34, 35, 36, EOS],
    # prompt 1: every reward equal (zero std; only the KL tells them apart)
    [41, 42, EOS],
    [43, 44, EOS],
    [45, 46, EOS],
    [47, 48, EOS],
    # prompt 2: two truncated, one EOS alone
    [201, 201, 202, 203, 204, 205],
    [210, EOS],
    [EOS],
    [220, 221, 222, 223, 224, 225],
]
TRUNCATED = [ids[-1] != EOS for ids in COMPLETIONS]
TOLERANCE = 1e-5


def length_reward(completion_ids, **kwargs):
    """0.5 per token, 1 for ending in EOS, 0.1 when the first token is odd."""
    return [0.5 * len(ids) + (ids[-1] == EOS) + 0.1 * (ids[0] % 2) for ids in completion_ids]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rloo-tiny")
    build_demo_model(path, hidden_size=64, layers=2)
    return path


def _perturb(model, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def _trl(model_dir, tmp_path, settings):
    """TRL's trainer on the fixed completions, its rollout outputs and the policy."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    _perturb(model, seed=1, scale=0.02)  # the reference (loaded from model_dir by TRL) differs
    args = RLOOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=K * len(PROMPTS),
        num_generations=K,
        max_completion_length=MAX_LEN,
        save_strategy="no",
        **settings,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RLOOTrainer(
            model=model,
            reward_funcs=length_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tokenizer,
        )
    completions = [list(ids) for ids in COMPLETIONS]
    trainer._generate_single_turn = lambda *args, **kwargs: completions
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    inputs = [{"prompt": prompt} for prompt in PROMPTS for _ in range(K)]
    outputs = trainer._generate_and_score_completions(inputs)
    return trainer, model, outputs, tokenizer


def _align_batches(outputs, tokenizer, packed, splits=None):
    """align's rollout batches of TRL's prompt ids and the completions; ``splits``: prompts per
    micro-batch (default: one micro-batch)."""
    prompts = [
        row[mask.bool()].tolist()
        for row, mask in zip(outputs["prompt_ids"][::K], outputs["prompt_mask"][::K], strict=True)
    ]
    batches, start = [], 0
    for size in splits or [len(PROMPTS)]:
        rows = slice(start * K, (start + size) * K)
        examples = [{"prompt_input_ids": ids} for ids in prompts[start : start + size]]
        completions = COMPLETIONS[rows]
        batch = rollout_batch(
            examples, completions, K, tokenizer.pad_token_id, packed, TRUNCATED[rows]
        )
        add_rewards(batch, ["length"], [1.0], [length_reward(completion_ids=completions)])
        batches.append(batch)
        start += size
    return batches


def _gradients(model):
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _assert_gradients_equal(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _case(beta=0.05, iterations=1, masked=False, **more):
    return {
        "beta": beta,
        "num_iterations": iterations,
        "mask_truncated_completions": masked,
        "epsilon": 0.2,
        **more,
    }


CASES = {
    "defaults": _case(),
    "no-reference": _case(beta=0.0),
    "large-beta": _case(beta=0.5),
    "normalized": _case(normalize_advantages=True),
    "clipped-rewards": _case(beta=0.0, reward_clip_range=(1.6, 3.0)),
    "clipped-rewards-kl-normalized": _case(
        beta=0.1, reward_clip_range=(1.6, 3.0), normalize_advantages=True
    ),
    "masked": _case(masked=True),
    "reused-clip": _case(beta=0.1, iterations=2, epsilon_high=0.28),
    "reused-clip-masked-normalized": _case(
        beta=0.1, iterations=3, masked=True, normalize_advantages=True
    ),
    # TRL scores log-probs, the reference's and the old policy's too, under softmax(logits / T)
    "reused-clip-temperature": _case(beta=0.1, iterations=2, temperature=0.7),
}


def _align_options(settings):
    values = {k: v for k, v in settings.items() if k != "temperature"}
    if values.get("reward_clip_range") is not None:
        values["reward_clip_range"] = list(values["reward_clip_range"])
    return RLOOOptions(num_generations=K, **values)


@pytest.mark.parametrize("case", list(CASES))
def test_advantages_loss_gradients_and_metrics_equal_trl(case, model_dir, tmp_path):
    settings = CASES[case]
    beta, iterations = settings["beta"], settings["num_iterations"]
    trainer, model, outputs, tokenizer = _trl(model_dir, tmp_path, settings)
    options = _align_options(settings)
    config = SimpleNamespace(
        max_completion_length=MAX_LEN, temperature=settings.get("temperature", 1.0)
    )
    run = SimpleNamespace(accelerator=_OneProcess(), config=config)
    reference = None
    if beta > 0:
        reference = ModelReference(AutoModelForCausalLM.from_pretrained(model_dir))

    layouts = {packed: _align_batches(outputs, tokenizer, packed) for packed in (False, True)}
    # Micro-batches of 2 prompts and 1: normalisation spans the whole round.
    split = _align_batches(outputs, tokenizer, False, splits=(2, 1))
    for batches in (*layouts.values(), split):
        align_prepare_rollouts(
            model=model, batches=batches, options=options, reference=reference, run=run
        )
        got = torch.cat([b["advantages"] for b in batches])
        assert (got - outputs["advantages"]).abs().max().item() < TOLERANCE
        assert ("kl" in batches[0]) == (beta > 0)
        assert ("old_logps" in batches[0]) == (iterations > 1)
    assert outputs["advantages"].abs().max() > 0.1  # not all zero
    if iterations > 1:  # the policy moves away from the one that sampled
        _perturb(model, seed=2, scale=0.05)

    trl_loss = trainer.compute_loss(model, outputs)
    trl_loss.backward()
    trl_grads = _gradients(model)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    for packed, (batch,) in layouts.items():
        counts = align_loss_counts(batch=batch)
        out = align_compute_loss(model=model, batch=batch, options=options, run=run)
        assert float(out.count) == float(counts["loss"]) == K * len(PROMPTS)
        loss = out.loss / out.count
        assert abs(loss.item() - trl_loss.item()) < TOLERANCE, (packed, loss.item())
        loss.backward()
        _assert_gradients_equal(_gradients(model), trl_grads)
        sums = MetricSums()
        sums.add_all(out.metrics)
        metrics = sums.reduce()
        names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean"]
        names += ["clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max"]
        names += ["frac_reward_zero_std"] + ["kl"] * (beta > 0)
        for name in names:
            assert abs(metrics[name] - trl_metrics[name]) < TOLERANCE, (packed, name)
        assert ("kl" in metrics) == (beta > 0)
    if beta > 0:
        assert abs(trl_metrics["kl"]) > 1e-3  # the policy is away from the reference
    if iterations > 1:
        assert trl_metrics["clip_ratio/region_mean"] > 0  # the clip was exercised


@pytest.mark.parametrize("case", ["defaults", "reused-clip-masked-normalized"])
def test_accumulation_equals_one_batch_and_trl_s_micro_batches(case, model_dir, tmp_path):
    """A step over micro-batches of 2 prompts and 1 has the loss and gradients of one large
    batch, and those of TRL accumulating two equal micro-batches of 6 completions (the
    Trainer's mean of per-micro-batch means, each divided by the accumulation steps)."""
    from trl.trainer.utils import split_tensor_dict

    settings = CASES[case]
    trainer, model, outputs, tokenizer = _trl(model_dir, tmp_path, settings)
    options = _align_options(settings)
    run = SimpleNamespace(
        accelerator=_OneProcess(),
        config=SimpleNamespace(max_completion_length=MAX_LEN, temperature=1.0),
    )
    reference = ModelReference(AutoModelForCausalLM.from_pretrained(model_dir))
    whole = _align_batches(outputs, tokenizer, True)
    split = _align_batches(outputs, tokenizer, False, splits=(2, 1))
    for batches in (whole, split):
        align_prepare_rollouts(
            model=model, batches=batches, options=options, reference=reference, run=run
        )
    if settings["num_iterations"] > 1:
        _perturb(model, seed=2, scale=0.05)

    trl_total = 0.0
    for part in split_tensor_dict(outputs, 2):  # TRL's accumulation of two micro-batches
        loss = trainer.compute_loss(model, part) / 2
        loss.backward()
        trl_total += loss.item()
    trl_grads = _gradients(model)

    def step(batches):
        counts = sum(align_loss_counts(batch=b)["loss"] for b in batches)
        total = 0.0
        for batch in batches:
            out = align_compute_loss(model=model, batch=batch, options=options, run=run)
            loss = out.loss / counts  # what the core does: each micro-batch over the step's count
            loss.backward()
            total += loss.item()
        return total, _gradients(model)

    whole_loss, whole_grads = step(whole)
    split_loss, split_grads = step(split)
    assert split_loss == pytest.approx(whole_loss, abs=TOLERANCE)
    assert whole_loss == pytest.approx(trl_total, abs=TOLERANCE)
    _assert_gradients_equal(split_grads, whole_grads)
    _assert_gradients_equal(whole_grads, trl_grads)
    # The micro-batches' own means averaged, as TRL averages its micro-batches, give another
    # gradient on this uneven split: align's sum over the step's count is what keeps it exact.
    for batch in split:
        out = align_compute_loss(model=model, batch=batch, options=options, run=run)
        (out.loss / out.count / len(split)).backward()
    mean_of_means = _gradients(model)
    pairs = zip(mean_of_means, whole_grads, strict=True)
    difference = max((a - b).abs().max().item() for a, b in pairs)
    assert difference > 1e-3 * max(g.abs().max().item() for g in whole_grads)
