"""GRPO against TRL 1.16's GRPOTrainer on the same fixed rollouts.

TRL's generation is replaced by fixed completions (some ending in EOS, some truncated at
``max_completion_length``); ``GRPOTrainer._generate_and_score_completions`` tokenises the
prompts, scores the completions with a deterministic reward and computes the advantages (and,
with ``num_iterations > 1``, the old log-probs; with ``beta > 0`` the reference's), and
``compute_loss`` gives TRL's loss and metrics. align's rollout batch is built from TRL's own
prompt ids and the same completions (``align.rollout.batch``), in the padded and the packed
layout, and the plugin's hooks must give the same advantages, loss, gradients and metrics.

The policy starts away from the reference (its weights are perturbed once, before TRL loads
the reference from the saved directory), so the KL is not 0; with ``num_iterations > 1`` the
policy is perturbed again between sampling and the loss, so the ratio to the old policy leaves
the clip range on some tokens.
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
from align_grpo import GRPOOptions, align_compute_loss, align_loss_counts, align_prepare_rollouts

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations

G = 4
MAX_LEN = 6
EOS = 2
PROMPTS = ["What is 7 + 12?", "Say hi", "What is 3 + 4? Answer:"]
COMPLETIONS = [
    # prompt 0: mixed rewards, one truncated
    [40, 50, EOS],
    [60, EOS],
    [70, 80, 90, 100, 110, 120],
    [33, 34, 35, 36, EOS],
    # prompt 1: every reward equal (zero std, zero advantages)
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
    path = tmp_path_factory.mktemp("grpo-tiny")
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
    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=G * len(PROMPTS),
        num_generations=G,
        max_completion_length=MAX_LEN,
        save_strategy="no",
        **settings,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=length_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tokenizer,
        )
    completions = [list(ids) for ids in COMPLETIONS]
    trainer._generate_single_turn = lambda *args, **kwargs: (completions, None)
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    inputs = [{"prompt": prompt} for prompt in PROMPTS for _ in range(G)]
    outputs = trainer._generate_and_score_completions(inputs)
    return trainer, model, outputs, tokenizer


def _align_batches(outputs, tokenizer, packed, splits=None):
    """align's rollout batches of TRL's prompt ids and the completions; ``splits``: prompts per
    micro-batch (default: one micro-batch)."""
    prompts = [
        row[mask.bool()].tolist()
        for row, mask in zip(outputs["prompt_ids"][::G], outputs["prompt_mask"][::G], strict=True)
    ]
    batches, start = [], 0
    for size in splits or [len(PROMPTS)]:
        rows = slice(start * G, (start + size) * G)
        examples = [{"prompt_input_ids": ids} for ids in prompts[start : start + size]]
        completions = COMPLETIONS[rows]
        batch = rollout_batch(
            examples, completions, G, tokenizer.pad_token_id, packed, TRUNCATED[rows]
        )
        add_rewards(batch, ["length"], [1.0], [length_reward(completion_ids=completions)])
        batches.append(batch)
        start += size
    return batches


def _gradients(model):
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _case(loss_type, scale_rewards="group", beta=0.0, masked=False, iterations=1, **more):
    return {
        "loss_type": loss_type,
        "scale_rewards": scale_rewards,
        "beta": beta,
        "mask_truncated_completions": masked,
        "num_iterations": iterations,
        "epsilon": 0.2,
        **more,
    }


CASES = {
    "dapo": _case("dapo"),
    "grpo": _case("grpo"),
    "dr_grpo-none": _case("dr_grpo", "none"),
    "bnpo-batch": _case("bnpo", "batch"),
    "dapo-kl": _case("dapo", beta=0.1),
    "grpo-kl-unbiased-off": _case("grpo", "none", beta=0.1, use_bias_correction_kl=False),
    "dapo-kl-masked-clip": _case("dapo", "batch", 0.1, True, 2, epsilon_high=0.28),
    "grpo-kl-masked-clip": _case("grpo", "none", 0.1, True, 2),
    "dr_grpo-kl-masked-clip": _case("dr_grpo", "group", 0.05, True, 2, epsilon_high=0.28),
    "bnpo-kl-masked-clip": _case("bnpo", "group", 0.1, True, 2),
    "grpo-batch-clip": _case("grpo", "batch", 0.0, False, 3, epsilon_high=0.28),
    "dapo-clip-kl-unbiased-off": _case("dapo", "none", 0.1, False, 2, use_bias_correction_kl=False),
    # TRL scores log-probs, the reference's too, under the sampling temperature's softmax
    "grpo-kl-clip-temperature": _case("grpo", "group", 0.1, False, 2, temperature=0.7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_advantages_loss_gradients_and_metrics_equal_trl(case, model_dir, tmp_path):
    settings = CASES[case]
    loss_type, beta, iterations = (
        settings["loss_type"],
        settings["beta"],
        settings["num_iterations"],
    )
    trainer, model, outputs, tokenizer = _trl(model_dir, tmp_path, settings)
    assert ("old_per_token_logps" in outputs) == (iterations > 1)
    temperature = settings.get("temperature", 1.0)
    options = GRPOOptions(
        num_generations=G, **{k: v for k, v in settings.items() if k != "temperature"}
    )
    config = SimpleNamespace(max_completion_length=MAX_LEN, temperature=temperature)
    run = SimpleNamespace(accelerator=_OneProcess(), config=config)
    reference = None
    if beta > 0:
        reference = ModelReference(AutoModelForCausalLM.from_pretrained(model_dir))

    layouts = {packed: _align_batches(outputs, tokenizer, packed) for packed in (False, True)}
    # Micro-batches of 2 prompts and 1: "batch" scaling spans the whole round.
    split = _align_batches(outputs, tokenizer, False, splits=(2, 1))
    for batches in (*layouts.values(), split):
        align_prepare_rollouts(model=model, batches=batches, options=options, run=run)
        got = torch.cat([b["advantages"] for b in batches])
        assert (got - outputs["advantages"]).abs().max().item() < TOLERANCE
    if iterations > 1:  # the policy moves away from the one that sampled
        _perturb(model, seed=2, scale=0.05)

    trl_loss = trainer.compute_loss(model, outputs)
    trl_loss.backward()
    trl_grads = _gradients(model)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    for packed, (batch,) in layouts.items():
        counts = align_loss_counts(batch=batch, options=options, config=run.config)
        out = align_compute_loss(
            model=model, batch=batch, options=options, reference=reference, run=run
        )
        assert float(out.count) == float(counts["loss"])
        loss = out.loss / out.count
        assert abs(loss.item() - trl_loss.item()) < TOLERANCE, (packed, loss.item())
        loss.backward()
        for ours, theirs in zip(_gradients(model), trl_grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
        sums = MetricSums()
        sums.add_all(out.metrics)
        metrics = sums.reduce()
        names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean"]
        names += ["clip_ratio/region_mean", "frac_reward_zero_std"] + ["kl"] * (beta > 0)
        names += ["clip_ratio/low_min", "clip_ratio/high_max"]
        for name in names:
            assert abs(metrics[name] - trl_metrics[name]) < TOLERANCE, (packed, name)
        assert ("kl" in metrics) == (beta > 0)
    if iterations > 1:
        assert trl_metrics["clip_ratio/region_mean"] > 0  # the clip was exercised
        assert trl_metrics["clip_ratio/high_max"] > 0 or trl_metrics["clip_ratio/low_min"] > 0

    if loss_type != "bnpo":  # TRL's bnpo is a mean per micro-batch, by design
        total = count = 0.0
        for batch in split:
            out = align_compute_loss(
                model=model, batch=batch, options=options, reference=reference, run=run
            )
            total, count = total + out.loss.item(), count + float(out.count)
        assert abs(total / count - trl_loss.item()) < TOLERANCE


def test_round_metrics_equal_trl(model_dir, tmp_path):
    """The core's completion-length metrics of a round, terminated lengths included, and its
    token count are TRL's on the same completions (three truncated, one EOS alone)."""
    from align.data.batching import count_sequence_tokens
    from align.rollout.engine import RolloutEngine

    trainer, _model, outputs, tokenizer = _trl(model_dir, tmp_path, _case("dapo"))
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    for packed in (False, True):
        sums = MetricSums()
        engine = SimpleNamespace(rewards={"train": SimpleNamespace(names=["length"])})
        batches = _align_batches(outputs, tokenizer, packed, splits=(2, 1))
        RolloutEngine._round_metrics(engine, batches, sums, _OneProcess())
        ours = sums.reduce()
        names = [n for n in trl_metrics if n.startswith("completions/")]
        assert "completions/min_terminated_length" in names
        assert "completions/max_terminated_length" in names
        for name in names:
            assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-6), (packed, name)
        # TRL's num_tokens: every completion's prompt and completion tokens
        tokens = sum(float(count_sequence_tokens(b)) for b in batches)
        assert tokens == trl_metrics["num_tokens"], packed
    terminated = [len(ids) for ids in COMPLETIONS if ids[-1] == EOS]
    assert trl_metrics["completions/min_terminated_length"] == min(terminated) == 1
    assert trl_metrics["completions/max_terminated_length"] == max(terminated) == 5
