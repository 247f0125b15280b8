"""Parity with TRL 1.16's ``OnlineDPOTrainer`` on the same completions.

A real ``OnlineDPOTrainer`` (tiny Llama policy, a different tiny Llama as its ``ref_model``, one
reward function) runs one ``training_step`` with its ``_generate`` replaced by a fixed pair of
completions per prompt; align's hooks get the same completions as the core lays them out
(``align.rollout.batch``), padded and packed. Loss, gradients and TRL's logged metrics agree to
1e-5. ``objective/kl``, ``objective/entropy``, ``objective/non_score_reward`` and
``objective/rlhf_reward`` are compared where no completion is padded: TRL sums them over the
padded width of its completion tensor, pad positions included, and align over completion tokens.
"""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from align.reference import ModelReference
from align.rollout.batch import add_rewards, rollout_batch
from align.testing import reset_accelerate
from align_online_dpo import OnlineDPOOptions, align_compute_loss, align_prepare_rollouts

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that trl.experimental is experimental
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

PAD, BOS, EOS, VOCAB = 0, 1, 2, 32
PROMPTS = [[BOS, 5, 6, 7], [BOS, 8, 9, 3], [BOS, 4, 4, 30]]  # one length: TRL left-pads none

# Each prompt's two samples and their rewards. A completion without EOS is cut at the longest
# length (TRL's max_new_tokens), as generation leaves it.
SCENARIOS = {
    "ragged": [  # completions of different lengths: TRL pads them
        (([10, 11, EOS], 0.0), ([12, EOS], 1.0)),  # the second wins
        (([13, 14, 15, 16, 17], 1.0), ([18, EOS], 0.5)),  # the first, unless it loses its EOS
        (([19, EOS], 0.5), ([20, 21, 22, EOS], 0.5)),  # a tie: the first
    ],
    "equal": [  # every completion 4 tokens: nothing is padded
        (([10, 11, 12, EOS], 1.0), ([13, 14, 15, 16], 1.0)),  # a tie, or the penalty decides
        (([17, 18, 19, 20], 2.0), ([21, 22, 23, EOS], 1.5)),
        (([24, 25, 26, EOS], 0.0), ([27, 28, 29, EOS], 0.0)),
    ],
}
PAIR_METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "objective/scores_margin",
    "objective/scores",
    "val/contain_eos_token",
    "beta",
]
PER_TOKEN_METRICS = [
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
]


def _model(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # log-probs far from uniform
        for p in model.parameters():
            p.mul_(4.0)
    return model


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    backend = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _trl_step(scenario, options, tmp_path):
    """One ``OnlineDPOTrainer.training_step`` on the scenario's completions: its loss, its
    logged stats and the policy's gradients. TRL's rows are every prompt's first sample, then
    every prompt's second."""
    samples = SCENARIOS[scenario]
    width = max(len(c) for pair in samples for c, _ in pair)
    order = [pair[0] for pair in samples] + [pair[1] for pair in samples]
    completion_ids = torch.full((len(order), width), PAD)
    completion_mask = torch.zeros((len(order), width), dtype=torch.long)
    for row, (ids, _) in enumerate(order):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    prompt_ids = torch.tensor(PROMPTS).repeat(2, 1)

    def generate(model, prompts, images=None):
        return prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask, None

    def reward(completions, **kwargs):
        assert len(completions) == len(order)
        return [r for _, r in order]

    policy, ref = _model(0), _model(1)
    prompts = ["w5 w6 w7"] * len(PROMPTS)  # text for TRL's dataset; generation is replaced
    reset_accelerate()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers: gradient_checkpointing is renamed
            args = OnlineDPOConfig(
                output_dir=str(tmp_path),
                beta=options.beta,
                loss_type=options.loss_type,
                missing_eos_penalty=options.missing_eos_penalty,
                max_new_tokens=width,
                max_length=64,
                bf16=False,
                gradient_checkpointing=False,
                use_cpu=True,
                report_to="none",
                per_device_train_batch_size=len(PROMPTS),
            )
            trainer = OnlineDPOTrainer(
                model=policy,
                ref_model=ref,
                reward_funcs=reward,
                args=args,
                train_dataset=Dataset.from_dict({"prompt": prompts}),
                processing_class=_tokenizer(),
            )
        trainer._generate = generate
        assert trainer.eos_token_ids == [EOS]
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.training_step(trainer.model, {"prompt": prompts})
        stats = {name: values[-1] for name, values in trainer.stats.items()}
        grads = {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
        return loss.item(), stats, grads
    finally:
        reset_accelerate()


def _align_step(scenario, options, packed):
    """The same completions through align: the core's rollout batch (prompt by prompt), then
    ``align_prepare_rollouts`` and ``align_compute_loss``; the step's loss is sum / count."""
    samples = SCENARIOS[scenario]
    completions = [ids for pair in samples for ids, _ in pair]
    rewards = [r for pair in samples for _, r in pair]
    truncated = [EOS not in ids for ids in completions]
    examples = [{"prompt_input_ids": p} for p in PROMPTS]
    batch = rollout_batch(examples, completions, 2, PAD, packed, truncated)
    add_rewards(batch, ["reward"], [1.0], [rewards])
    batch = align_prepare_rollouts(batches=[batch], options=options)[0]
    policy, ref = _model(0), _model(1)
    output = align_compute_loss(
        model=policy, batch=batch, options=options, reference=ModelReference(ref)
    )
    loss = output.loss / output.count
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    means = {k: float(s) / float(c) for k, (s, c) in output.metrics.items()}
    return loss.item(), means, grads


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("missing_eos_penalty", [None, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_gradients_and_metrics_equal_trl(scenario, missing_eos_penalty, loss_type, tmp_path):
    options = OnlineDPOOptions(loss_type=loss_type, missing_eos_penalty=missing_eos_penalty)
    trl_loss, trl_stats, trl_grads = _trl_step(scenario, options, tmp_path)
    assert trl_loss > 1e-3  # the policy and the reference differ: a loss worth comparing
    names = PAIR_METRICS + (PER_TOKEN_METRICS if scenario == "equal" else [])
    for packed in (False, True):
        loss, means, grads = _align_step(scenario, options, packed)
        assert loss == pytest.approx(trl_loss, abs=1e-5, rel=1e-6), packed
        assert sorted(means) == sorted(trl_stats)  # every metric TRL logs, by its name
        for name in names:
            assert means[name] == pytest.approx(trl_stats[name], abs=1e-5), (name, packed)
        assert grads.keys() == trl_grads.keys()
        for name, grad in grads.items():
            scale = max(1.0, trl_grads[name].abs().max().item())
            assert torch.allclose(grad, trl_grads[name], rtol=1e-5, atol=1e-5 * scale), name


def test_per_token_metrics_differ_from_trl_only_by_padding(tmp_path):
    """With padded completions TRL's objective/kl adds the pad positions' log-ratios; align's
    is the sum over completion tokens (what TRL gives where nothing is padded)."""
    options = OnlineDPOOptions()
    _, trl_stats, _ = _trl_step("ragged", options, tmp_path)
    _, means, _ = _align_step("ragged", options, packed=False)
    assert means["objective/kl"] != pytest.approx(trl_stats["objective/kl"], abs=1e-3)
