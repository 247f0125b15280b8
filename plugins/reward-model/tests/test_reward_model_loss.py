"""The reward model's loss against a hand computation, its scores of packed batches against
padded ones, and what a run leaves: final/ (a model, or a LoRA adapter with its trained head)
loads as a sequence classifier and scores; what cannot apply to a reward model is refused."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import align
from align.cli import cli
from align.data.batching import paired_batch
from align.data.packing import pack_in_order
from align.testing import reset_accelerate
from align_reward_model import RewardModelOptions
from align_reward_model.loss import pair_losses, reward_model_loss


class FixedScores(torch.nn.Module):
    """A "model" whose scores are given: row ``i`` of the batch scores ``values[i]``."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.nn.Parameter(torch.tensor(values))

    def forward(self, input_ids, attention_mask, use_cache):
        return SimpleNamespace(logits=self.values.unsqueeze(-1))


def _padded_pairs(n):
    examples = [
        {
            "chosen_input_ids": [1, 5, 6], "chosen_completion_mask": [0, 1, 1],
            "rejected_input_ids": [1, 7], "rejected_completion_mask": [0, 1],
        }
    ] * n  # fmt: skip
    return paired_batch(examples, 0)


def _bt(x):  # −log σ(x), by hand
    return math.log(1 + math.exp(-x))


def test_loss_and_metrics_equal_a_hand_computation():
    chosen, rejected, margins = [2.0, -1.0, 0.5], [1.0, 0.5, 0.5], [0.5, 0.0, 1.0]
    model = FixedScores(chosen + rejected)
    batch = _padded_pairs(3)
    batch["margin"] = torch.tensor(margins)
    output = reward_model_loss(model, batch, RewardModelOptions(center_rewards_coefficient=0.1))
    per_pair = [
        _bt(c - r - m) + 0.1 * (c + r) ** 2
        for c, r, m in zip(chosen, rejected, margins, strict=True)
    ]
    assert output.count == 3
    assert output.loss.item() == pytest.approx(sum(per_pair), rel=1e-6)
    metrics = output.metrics
    assert float(metrics["accuracy"][0]) / metrics["accuracy"][1] == pytest.approx(1 / 3)  # tie
    assert float(metrics["margin"][0]) / metrics["margin"][1] == pytest.approx(-0.5 / 3)
    assert float(metrics["mean_reward"][0]) / metrics["mean_reward"][1] == pytest.approx(3.5 / 6)
    assert (metrics["min_reward"].kind, float(metrics["min_reward"].values.min())) == ("min", -1)
    assert (metrics["max_reward"].kind, float(metrics["max_reward"].values.max())) == ("max", 2)
    output.loss.backward()  # d/dc of −log σ(c − r − m) + k(c + r)²: −σ(−(c−r−m)) + 2k(c + r)
    sig = [1 / (1 + math.exp(c - r - m)) for c, r, m in zip(chosen, rejected, margins, strict=True)]
    want = [-s + 0.2 * (c + r) for s, c, r in zip(sig, chosen, rejected, strict=True)]
    assert model.values.grad[:3].tolist() == pytest.approx(want, rel=1e-5)


def test_without_margin_or_centring_the_loss_is_plain_bradley_terry():
    losses = pair_losses(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert losses.tolist() == pytest.approx([_bt(1.0), _bt(-2.0)])


@pytest.fixture
def unfused_flex(monkeypatch):
    """FlexAttention without torch.compile, which on the CPU is a long C++ build."""
    from align.testing import unfused_flex_attention

    unfused_flex_attention(monkeypatch)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_packed_scores_equal_padded_ones(pad_is_eos, attention, unfused_flex):
    """Each sequence's score in a packed batch (shared prompts, several pairs per row) is its
    score alone in a padded row, also where the pad token is EOS (then the model scores the
    last token before the trailing EOS, as its own pooling does); under the dense mask and
    under FlexAttention's block mask (what a CUDA run packs with; its forward runs here)."""
    pad, eos = (2, 2) if pad_is_eos else (0, 2)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=pad,
        eos_token_id=eos, initializer_range=0.5,
    )  # fmt: skip
    model = AutoModelForSequenceClassification.from_config(config).eval()
    pairs = [
        ([1, 5, 6, 7], [10, 11, eos], [12, eos]),
        ([1, 8], [13, 14, 15, 16, eos], [18, eos]),
        ([1, 4, 9], [eos], [20, 21, eos]),  # an answer that is EOS alone
    ]
    examples = [
        {
            "chosen_input_ids": p + c, "chosen_completion_mask": [0] * len(p) + [1] * len(c),
            "rejected_input_ids": p + r, "rejected_completion_mask": [0] * len(p) + [1] * len(r),
        }
        for p, c, r in pairs
    ]  # fmt: skip
    groups = [
        [(e[f"{s}_input_ids"], e[f"{s}_completion_mask"]) for s in ("chosen", "rejected")]
        for e in examples
    ]
    dense = attention == "sdpa"
    slots = [[i, 3 + i] for i in range(3)]
    packed = pack_in_order(groups, slots, pad, dense_mask=dense, row_tokens=64)
    assert packed["input_ids"].shape[0] == 1  # every pair in one row
    with torch.no_grad():
        want = align.sequence_scores(model, paired_batch(examples, pad))
        model.set_attn_implementation(attention)
        got = align.sequence_scores(model, packed)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert want.unique().numel() == 6


# -- runs -----------------------------------------------------------------------------------------
def _run(*args):
    reset_accelerate()
    try:
        return CliRunner().invoke(cli, ["run", *args])
    finally:
        reset_accelerate()


@pytest.fixture
def preference_data(tmp_path):
    rows = [
        {"prompt": "3 + 4 =", "chosen": " 7", "rejected": " 8", "margin": 1.0},
        {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
        {"prompt": "1 + 5 =", "chosen": " 6", "rejected": " 9", "margin": 0.5},
        {"prompt": "6 + 1 =", "chosen": " 7", "rejected": " 2"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_run_saves_a_reward_model_that_loads_and_scores(tmp_path, preference_data, monkeypatch):
    from align import demo

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = _run(
        "--objective", "reward-model", "--model", "demo", "--data", str(preference_data),
        "--max-steps", "3", "--batch-size", "2", "--output-dir", str(out), "--lr", "1e-2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert name in rows[-1], name
    assert rows[-1]["num_tokens"] > 0  # counted from the batches, not from log-probs
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.pad_token_id == tokenizer.pad_token_id
    start = AutoModelForSequenceClassification.from_pretrained(demo.demo_model_path(), num_labels=1)
    body = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[body], start.state_dict()[body])  # trained
    inputs = tokenizer(["3 + 4 = 7", "3 + 4 = 8 8 8"], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**inputs).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    card = (out / "final" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card
    assert "AutoModelForSequenceClassification" in card
    chat = CliRunner().invoke(cli, ["generate", str(out), "--prompt", "3 + 4 ="])
    assert chat.exit_code != 0 and "is a reward model" in chat.output, chat.output


def test_lora_trains_the_score_head_alongside_the_adapter(tmp_path, preference_data, monkeypatch):
    from peft import AutoPeftModelForSequenceClassification

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = _run(
        "--objective", "reward-model", "--model", "demo", "--data", str(preference_data),
        "--max-steps", "3", "--batch-size", "2", "--output-dir", str(out), "--lr", "1e-2",
        "--lora",
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS"
    from safetensors.torch import load_file

    saved = load_file(str(out / "final" / "adapter_model.safetensors"))
    heads = [k for k in saved if ".score." in k or k.endswith("score.weight")]
    assert heads, sorted(saved)[:5]  # the head is saved with the adapter
    card = (out / "final" / "README.md").read_text()
    assert "AutoPeftModelForSequenceClassification" in card and "num_labels=1" in card
    model = AutoPeftModelForSequenceClassification.from_pretrained(out / "final", num_labels=1)
    trained = model.base_model.model.score.modules_to_save["default"].weight
    torch.manual_seed(42)  # the run's seed, drawn right before loading: the head it started at
    start = AutoModelForSequenceClassification.from_pretrained(
        str(json.loads((out / "run.json").read_text())["config"]["model"]), num_labels=1
    ).score.weight
    assert trained.shape == start.shape
    assert not torch.allclose(trained, start)  # the head trained, not only the adapter
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    chat = CliRunner().invoke(cli, ["chat", str(out / "final")], input="hi\n")
    assert chat.exit_code != 0 and "is a reward model" in chat.output, chat.output
    merged = tmp_path / "merged"  # align merge: a whole reward model, the trained head in it
    result = CliRunner().invoke(cli, ["merge", str(out / "final"), "--output", str(merged)])
    assert result.exit_code == 0, result.output
    whole = AutoModelForSequenceClassification.from_pretrained(merged)
    assert torch.allclose(whole.score.weight, trained)
    with torch.no_grad():
        assert torch.allclose(whole(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_a_merged_lora_reward_model_pads_as_it_trained(tmp_path, monkeypatch):
    """The base's config.json may name another pad token than the tokenizer's (here 5, the
    tokenizer's is 0): the run trains with the tokenizer's, and the adapter saves no config, so
    align merge must give the merged model the tokenizer's, or a padded batch is scored at a
    pad position; the merged model is a reward model ``--reward model:`` takes."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from align import demo
    from align.rollout.model_reward import model_reward

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    model = LlamaForCausalLM.from_pretrained(demo.demo_model_path())
    tokenizer = AutoTokenizer.from_pretrained(demo.demo_model_path())
    assert tokenizer.pad_token_id == 0
    model.config.pad_token_id = 5
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    pairs = [{"prompt": f"{a} + 1 =", "chosen": f" {a + 1}", "rejected": " 0"} for a in range(8)]
    out = tmp_path / "rm"
    align.train(
        "reward-model", str(base), pairs, max_steps=1, batch_size=8, lr=1e-2, lora=True,
        output_dir=str(out),
    )  # fmt: skip
    merged = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(out / "final"), "--output", str(merged)])
    assert result.exit_code == 0, result.output
    whole = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert whole.config.pad_token_id == tokenizer.pad_token_id
    adapted = AutoPeftModelForSequenceClassification.from_pretrained(
        out / "final", num_labels=1, pad_token_id=tokenizer.pad_token_id
    ).eval()  # the model as it trained
    inputs = tokenizer(["3 + 1 = 4", "1 + 1 = 2 2 2 2"], return_tensors="pt", padding=True)
    assert (inputs["input_ids"] == tokenizer.pad_token_id).any()  # a padded row
    with torch.no_grad():
        want, got = adapted(**inputs).logits, whole(**inputs).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got, want)
    assert model_reward(str(merged), "--reward").name == "merged"


def test_the_demo_trains_the_demo_model_on_the_demo_pairs(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = _run("--objective", "reward-model", "--max-steps", "2", "--output-dir", "rm")
    assert result.exit_code == 0, result.output + repr(result.exception)
    info = json.loads((tmp_path / "rm" / "run.json").read_text())
    assert info["data"]["train"]["path"].endswith("preference_train.jsonl")
    assert info["packed_batches"] is True  # the probe found the packed scores exact
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")


@pytest.mark.xdist_group("torchrun")
def test_two_processes_equal_one_large_batch(tmp_path, preference_data, monkeypatch):
    """Packed batches under DDP (the scores read the pad token through the wrapper, which
    has no config): batch 2 on two processes equals batch 4 on one, every metric."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    args = ["--objective", "reward-model", "--model", "demo", "--data", str(preference_data)]
    args += ["--eval-data", str(preference_data), "--max-steps", "2", "--lr", "1e-2"]
    two = [sys.executable, "-m", "align.cli", "run", *args, "--batch-size", "2"]
    two += ["--num-processes", "2", "--output-dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(two, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _run(*args, "--batch-size", "4", "--output-dir", str(tmp_path / "one"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    one, two = (
        [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("one", "two")
    )
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["packed_batches"] is True
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"step", "epoch", "learning_rate", "num_tokens_computed"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), key


def test_what_needs_log_probs_is_refused(tmp_path, preference_data, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    result = _run(
        "--objective", "reward-model", "--model", "demo", "--data", str(preference_data),
        "--eval-data", str(preference_data), "--eval-deviation", "--max-steps", "1",
        "--output-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.exit_code != 0
    assert "a sequence classification model, which has none" in result.output
    with pytest.raises(TypeError, match="has no log-probs"):
        align.Objective("x", "x", model_class="sequence_classification", needs_reference=True)
    with pytest.raises(TypeError, match="model_class must be one of"):
        align.Objective("x", "x", model_class="seq2seq")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "addition"], r"for on-policy objectives \(.*online-dpo, rloo\)"),
        (["--ref-model", "demo"], r"uses no reference model .*\(it trains a sequence class"),
    ],
)
def test_what_a_reward_model_run_cannot_take_is_refused_truly(flags, message, tmp_path):
    """The refusals list today's on-policy objectives, and do not offer --eval-deviation,
    which a reward model's run refuses."""
    result = _run(
        "--objective", "reward-model", *flags, "--max-steps", "1",
        "--output-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.exit_code != 0
    assert re.search(message, result.output), result.output
    assert "eval-deviation" not in result.output


def test_a_given_model_must_be_a_one_label_classifier():
    from align.errors import ConfigError
    from align.loop.setup import load_model

    cfg = SimpleNamespace(gradient_checkpointing=False)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="the model given is a LlamaForCausalLM"):
        load_model(cfg, LlamaForCausalLM(config), "sequence_classification", 0)
    config.num_labels = 3
    three = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(ConfigError, match="num_labels=3"):
        load_model(cfg, three, "sequence_classification", 0)


def test_a_saved_classifier_with_other_labels_is_refused_by_path(tmp_path):
    """transformers raises a bare RuntimeError (the head's shape) for it."""
    from align.errors import ConfigError
    from align.model.loading import load_pretrained

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_labels=2,
    )  # fmt: skip
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "two")
    with pytest.raises(ConfigError, match=r"model '.*two' is a sequence classifier with num_l"):
        load_pretrained(str(tmp_path / "two"), False, "sequence_classification")


def test_a_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, preference_data, monkeypatch):
    """Stopped after step 2 of 5, ``--resume`` restores the adapter and the trained head (PEFT's
    modules_to_save) and ends with the same metrics and weights as a run never stopped."""
    import shutil

    from safetensors.torch import load_file

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    args = ["--objective", "reward-model", "--model", "demo", "--data", str(preference_data)]
    args += ["--batch-size", "2", "--max-steps", "5", "--save-every", "2", "--lr", "1e-2", "--lora"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert _run(*args, "--output-dir", str(whole)).exit_code == 0
    shutil.copytree(whole, stopped)  # what a run killed during step 3 leaves
    shutil.rmtree(stopped / "final")
    shutil.rmtree(stopped / "checkpoints" / "step-4")
    rows = (stopped / "metrics.jsonl").read_text().splitlines()
    (stopped / "metrics.jsonl").write_text(
        "".join(r + "\n" for r in rows if json.loads(r)["step"] <= 2)
    )
    info = json.loads((stopped / "run.json").read_text())
    (stopped / "run.json").write_text(json.dumps({**info, "status": "running"}))
    result = _run(*args, "--output-dir", str(stopped), "--resume")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Resuming at step 2 of 5" in result.output
    want = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert got == [pytest.approx(row, abs=1e-6, rel=0) for row in want]
    a = load_file(str(whole / "final" / "adapter_model.safetensors"))
    b = load_file(str(stopped / "final" / "adapter_model.safetensors"))
    assert any("score" in key for key in a) and a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


def test_chat_refuses_a_reward_model_named_by_hub_id(tmp_path):
    """A hub id is no directory to look into first: the loaded config's architecture says it."""
    from align import demo
    from align.errors import ConfigError
    from align.tools.chat import Source, load

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_labels=1,
    )  # fmt: skip
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    source = Source(str(tmp_path), None, str(demo.demo_model_path()), "org/reward-model")
    with pytest.raises(ConfigError, match="org/reward-model is a reward model"):
        load(source)
