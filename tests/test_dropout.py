"""``disable_dropout``: the policy trains without dropout where the objective compares it with
a reference or runs a second pass (dpo, kto, minorsft, ift), as TRL does; sft keeps it."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    FalconConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
)

from align.cli import cli
from align.model.dropout import configs_as_given, disable_dropout

LN2 = math.log(2)


@pytest.fixture(scope="session")
def dropout_model_dir(model_dir, tmp_path_factory):
    """The demo Llama with attention dropout 0.5 (a probability its attention reads at forward
    time, not an ``nn.Dropout`` module) and the demo tokenizer."""
    path = tmp_path_factory.mktemp("dropout-model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LlamaConfig(**{**model.config.to_dict(), "attention_dropout": 0.5})
    dropped = AutoModelForCausalLM.from_config(config)
    dropped.load_state_dict(model.state_dict())
    dropped.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return path


@pytest.fixture
def pairs(tmp_path, write_jsonl):
    rows = [
        {"prompt": f"What is {a} + {b}? ", "chosen": f"{a + b}.", "rejected": f"{a + b + 1}."}
        for a, b in [(1, 2), (10, 20), (3, 4), (7, 30), (12, 1), (5, 5), (40, 2), (8, 9)]
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def _dpo(out, model, data, *flags):
    args = ["run", "--objective", "dpo", "--model", model, "--data", data, "--output-dir", out]
    result = CliRunner().invoke(
        cli,
        [*map(str, args), "--max-steps", "1", "--batch-size", "8", *flags],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return first["loss"], json.loads((out / "run.json").read_text())


@pytest.mark.parametrize(
    ("mode", "extra"),
    [("precomputed", []), ("model", []), ("adapter", ["--lora", "--set", "lora.dropout=0.1"])],
)
def test_dpo_step_one_is_ln2_on_a_model_with_dropout(
    tmp_path, dropout_model_dir, pairs, mode, extra
):
    loss, run = _dpo(tmp_path / "on", dropout_model_dir, pairs, "--reference", mode, *extra)
    assert loss == pytest.approx(LN2, abs=1e-6)
    assert run["config"]["disable_dropout"] is True  # the objective's default, recorded


def test_with_dropout_kept_the_step_one_loss_is_not_ln2(tmp_path, dropout_model_dir, pairs):
    """What the option prevents: policy = reference, yet dropout moves the loss off ln 2."""
    loss, run = _dpo(tmp_path / "off", dropout_model_dir, pairs, "--no-disable-dropout")
    assert abs(loss - LN2) > 1e-4, loss
    assert run["config"]["disable_dropout"] is False


def test_sft_keeps_dropout_by_default(tmp_path, dropout_model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    args = ["run", "--model", dropout_model_dir, "--data", data, "--output-dir", tmp_path / "o"]
    result = CliRunner().invoke(cli, [*map(str, args), "--max-steps", "1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["config"]["disable_dropout"] is False
    # the saved model keeps the user's configuration
    saved = json.loads((tmp_path / "o" / "final" / "config.json").read_text())
    assert saved["attention_dropout"] == 0.5


def _two_train_forwards(model, ids):
    model.train()
    with torch.no_grad():
        return model(ids).logits, model(ids).logits


def test_every_kind_of_dropout_is_switched_off():
    """``nn.Dropout`` modules (GPT-2's embedding, attention and residual dropout), attention
    probabilities read at forward time (Llama) and PEFT's ``lora_dropout``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    )

    def llama_config():
        return LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            attention_dropout=0.3,
            attn_implementation="eager",
        )

    llama = AutoModelForCausalLM.from_config(llama_config())
    lora = get_peft_model(
        AutoModelForCausalLM.from_config(llama_config()),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]),
    )
    for module in lora.modules():  # LoRA's B starts at 0: make the adapter contribute
        if hasattr(module, "lora_B"):
            for linear in module.lora_B.values():
                torch.nn.init.normal_(linear.weight)
    # modules, plus the config's keys above 0: GPT-2's resid/embd/attn_pdrop and
    # summary_first_dropout, Llama's attention_dropout
    for model, expected in ((gpt2, 2 * 3 + 1 + 4), (llama, 2 + 1), (lora, 2 * 2 + 2 + 1)):
        first, second = _two_train_forwards(model, ids)
        assert not torch.equal(first, second)  # dropout is on in train mode
        assert disable_dropout(model) == expected
        first, second = _two_train_forwards(model, ids)
        assert torch.equal(first, second)
        assert disable_dropout(model) == 0  # nothing left above 0


def test_dropout_read_from_the_config_or_as_layerdrop_is_switched_off_and_saved_as_given(
    tmp_path,
):
    """Falcon reads ``config.hidden_dropout`` and ``config.attention_dropout`` at forward time;
    OPT skips whole layers with ``layerdrop``. The saved config keeps the user's values."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    falcon = AutoModelForCausalLM.from_config(
        FalconConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_dropout=0.3,
            attention_dropout=0.3,
        )
    )
    opt = AutoModelForCausalLM.from_config(
        OPTConfig(
            vocab_size=64,
            hidden_size=32,
            word_embed_proj_dim=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            ffn_dim=64,
            dropout=0.0,
            layerdrop=0.5,
        )
    )
    for model in (falcon, opt):
        first, second = _two_train_forwards(model, ids)
        assert not torch.equal(first, second)
        assert disable_dropout(model) > 0
        first, second = _two_train_forwards(model, ids)
        assert torch.equal(first, second)
    with configs_as_given(falcon):
        falcon.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hidden_dropout"] == 0.3 and saved["attention_dropout"] == 0.3
    assert falcon.config.hidden_dropout == 0.0  # and training goes on without it
    assert opt.config.layerdrop == 0.0


def test_a_run_started_before_the_option_resumes_as_it_trained(tmp_path, model_dir, pairs):
    """A run.json without ``disable_dropout`` (written before the option existed) resumes,
    with dropout as that run had it (on), whatever the objective's default."""
    out = tmp_path / "run"
    args = ["run", "--objective", "dpo", "--model", model_dir, "--data", pairs]
    args += ["--output-dir", out, "--max-steps", "3", "--save-every", "1", "--batch-size", "4"]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = json.loads((out / "run.json").read_text())
    del run["config"]["disable_dropout"]
    run["status"] = "interrupted"
    (out / "run.json").write_text(json.dumps(run))
    import shutil

    shutil.rmtree(out / "final")
    resumed = CliRunner().invoke(cli, [*map(str, args), "--resume"])
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["config"]["disable_dropout"] is False
