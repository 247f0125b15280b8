"""Parity with TRL 1.16's ``RewardTrainer`` on the same model and the same pairs.

A tiny Llama causal LM is saved and loaded by both sides through ``from_pretrained`` as a
one-label sequence classifier: TRL's ``RewardTrainer(model=path)`` and align's
``load_model``, each seeding right before it, so the new ``score`` head is the same. Both get
the same token ids (TRL's preprocessed ``chosen_ids``/``rejected_ids`` columns, align's
examples of prompt and answer); TRL's ``compute_loss`` on its collator's batch against
align's loss on its padded and its packed batch: loss, every metric TRL logs and every
gradient agree to 1e-5.
"""

import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from align.data.batching import paired_batch
from align.data.packing import pack_in_order
from align.loop.setup import load_model
from align.testing import reset_accelerate
from align_reward_model import RewardModelOptions, align_compute_loss

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

PAD, BOS, EOS, VOCAB = 0, 1, 2, 32
SEED = 7
# (prompt, chosen answer, rejected answer, margin): answers end with EOS, as both tokenise
# plain text; lengths differ, so TRL pads and align packs the shared prompts.
PAIRS = [
    ([BOS, 5, 6, 7], [10, 11, EOS], [12, EOS], 0.5),
    ([BOS, 8, 9], [13, 14, 15, 16, EOS], [18, EOS], 0.0),
    ([BOS, 4], [19, EOS], [20, 21, 22, 23, 24, EOS], 1.5),
]
METRICS = ["accuracy", "margin", "mean_reward", "min_reward", "max_reward"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    backend = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny causal LM with scores far from 0 (a wide initialiser draws the new head)."""
    path = tmp_path_factory.mktemp("rm-parity-model")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.5,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _trl(model_dir, options, with_margin, tmp_path):
    rows = {
        "chosen_ids": [p + c for p, c, _, _ in PAIRS],
        "rejected_ids": [p + r for p, _, r, _ in PAIRS],
    }
    if with_margin:
        rows["margin"] = [m for *_, m in PAIRS]
    dataset = Dataset.from_dict(rows)
    reset_accelerate()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = RewardConfig(
                output_dir=str(tmp_path), seed=SEED, use_cpu=True, bf16=False,
                gradient_checkpointing=False, report_to="none",
                per_device_train_batch_size=len(PAIRS),
                center_rewards_coefficient=options.center_rewards_coefficient,
            )  # fmt: skip
            trainer = RewardTrainer(
                model=str(model_dir), args=args, train_dataset=dataset,
                processing_class=_tokenizer(),
            )  # fmt: skip
        model = trainer.model.train()
        inputs = trainer.data_collator([dataset[i] for i in range(len(PAIRS))])
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        metrics = {name: trainer._metrics["train"][name][-1] for name in METRICS}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), metrics, grads, model.score.weight.detach().clone()
    finally:
        reset_accelerate()


def _align(model_dir, options, with_margin, packed):
    cfg = SimpleNamespace(
        model=str(model_dir), trust_remote_code=False, gradient_checkpointing=False, seed=SEED
    )
    model = load_model(cfg, None, "sequence_classification", PAD).train()
    examples = [
        {
            "chosen_input_ids": p + c, "chosen_completion_mask": [0] * len(p) + [1] * len(c),
            "rejected_input_ids": p + r, "rejected_completion_mask": [0] * len(p) + [1] * len(r),
        }
        for p, c, r, _ in PAIRS
    ]  # fmt: skip
    if packed:
        n = len(examples)
        groups = [
            [(e[f"{s}_input_ids"], e[f"{s}_completion_mask"]) for s in ("chosen", "rejected")]
            for e in examples
        ]
        batch = pack_in_order(groups, [[i, n + i] for i in range(n)], PAD)
    else:
        batch = paired_batch(examples, PAD)
    margins = [m for *_, m in PAIRS] if with_margin else [0.0] * len(PAIRS)
    batch["margin"] = torch.tensor(margins)  # the field's default when the column is absent
    output = align_compute_loss(model=model, batch=batch, options=options)
    loss = output.loss / output.count
    loss.backward()
    metrics = {}
    for name, value in output.metrics.items():
        if hasattr(value, "kind"):  # align.Extreme: one micro-batch, one process
            metrics[name] = float(getattr(value.values, value.kind)())
        else:
            metrics[name] = float(value[0]) / float(value[1])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), metrics, grads, model.score.weight.detach().clone()


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_loss_metrics_and_gradients_equal_trl(model_dir, with_margin, center, tmp_path):
    options = RewardModelOptions(center_rewards_coefficient=center)
    trl_loss, trl_metrics, trl_grads, trl_head = _trl(model_dir, options, with_margin, tmp_path)
    assert 0 < trl_metrics["accuracy"] < 1  # a model that ranks some pairs wrong
    for packed in (False, True):
        loss, metrics, grads, head = _align(model_dir, options, with_margin, packed)
        assert torch.equal(head, trl_head)  # the new head drawn as TRL draws it
        assert loss == pytest.approx(trl_loss, abs=1e-5, rel=1e-6), packed
        assert sorted(metrics) == sorted(METRICS)
        for name in METRICS:
            assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), (name, packed)
        assert grads.keys() == trl_grads.keys()
        for name, grad in grads.items():
            scale = max(1.0, trl_grads[name].abs().max().item())
            assert torch.allclose(grad, trl_grads[name], atol=1e-5 * scale, rtol=0), (name, packed)
