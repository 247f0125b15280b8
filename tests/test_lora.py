"""The LoRA plugin with every objective: adapter-only training and checkpoints, the adapter
reference (and a starting adapter as reference), gradient checkpointing, merging, QLoRA's
refusal on CPU, and the lora-sft preset."""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from test_reference import _independent_loss, _prepared
from transformers import AutoModelForCausalLM, AutoTokenizer

import align
from align import plugins
from align.cli import cli


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def _rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _reference_info(out):
    return json.loads((out / "run.json").read_text()).get("reference")


@pytest.fixture
def data(tmp_path, write_jsonl, sft_rows):
    return write_jsonl(tmp_path / "train.jsonl", sft_rows)


class KeepModel:
    """Keeps the model the loss saw, to inspect its weights after the run."""

    __name__ = "keep-model"

    def __init__(self):
        self.model = None

    @align.hookimpl
    def align_metrics(self, model):
        self.model = model
        return {}


def test_lora_sft_on_the_demo_changes_only_adapter_weights(tmp_path):
    keep = KeepModel()
    plugins.reset_registry(plugins.load_plugins(extra=[keep]))
    out = tmp_path / "out"
    _run("--objective", "lora-sft", "--max-steps", 3, "--output-dir", out)
    from align import demo

    start = load_file(demo.demo_model_path() / "model.safetensors")
    adapters, base = {}, 0
    for name, param in keep.model.named_parameters():
        if "lora_" in name:
            adapters[name] = param
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param.detach(), start[key]), name  # bitwise
        assert not param.requires_grad
        base += 1
    assert base == len(start) and adapters
    assert any(p.detach().abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert not (out / "final" / "model.safetensors").exists()
    assert _reference_info(out) is None


def _train_adapter(tmp_path, model_dir, data):
    """A starting adapter whose B matrices are no longer zero (without dropout, which a
    starting adapter keeps from its own config)."""
    out = tmp_path / "start"
    _run(
        "--objective",
        "lora-sft",
        "--set",
        "lora.dropout=0",
        "--model",
        model_dir,
        "--data",
        data,
        "--max-steps",
        3,
        "--lr",
        5e-2,
        "--output-dir",
        out,
    )
    return out / "final"


def _policy(model_dir, adapter):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


@pytest.mark.parametrize("start_from_adapter", [False, True])
def test_the_adapter_reference_after_three_updates(
    tmp_path, model_dir, data, sft_pairs, start_from_adapter
):
    """DPO with LoRA, four steps on the whole data set: the step-4 loss (after three updates)
    equals a per-example recomputation whose reference is the starting model, or the starting
    adapter when the run began from one (not the bare base, and not the policy)."""
    extra = []
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if start_from_adapter:
        start = _train_adapter(tmp_path, model_dir, data)
        extra = ["--adapter", start]
        reference = _policy(model_dir, start)
    out = tmp_path / "dpo"
    _run(
        "--objective",
        "dpo",
        *([] if start_from_adapter else ["--lora"]),  # --adapter alone switches LoRA on
        "--set",
        "lora.dropout=0",  # dropout would make the training forward differ from eval mode
        *extra,
        "--model",
        model_dir,
        "--data",
        sft_pairs,
        "--max-steps",
        4,
        "--batch-size",
        8,
        "--lr",
        5e-2,
        "--save-every",
        3,
        "--output-dir",
        out,
    )
    assert _reference_info(out)["mode"] == "adapter"  # the default with LoRA
    train = _rows(out)
    assert train[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # starts at its reference
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = _prepared("dpo", sft_pairs, tokenizer)
    policy = _policy(model_dir, out / "checkpoints" / "step-3")
    loss, metrics = _independent_loss("dpo", policy, reference, examples)
    assert train[3]["loss"] == pytest.approx(loss, abs=1e-5)
    assert train[3]["rewards/chosen"] == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert abs(train[3]["rewards/chosen"]) > 1e-3  # the reference is not the policy
    final = out / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "reference").exists()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("objective", ["sft", "ift"])
def test_gradient_checkpointing_trains_every_lora_matrix(
    model_dir, tokenizer, objective, data, reentrant
):
    from align import default_batch
    from align.data.examples import tokenize_records
    from align.data.records import read_records
    from align_ift.loss import ift_loss
    from align_lora import LoraOptions
    from align_lora.adapter import add_adapter
    from align_sft.loss import sft_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    model = add_adapter(model, LoraOptions(enabled=True), SimpleConfig(True))
    with torch.no_grad():  # as after a first update: B ≠ 0, so A gets a gradient too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model.train()
    examples, _ = tokenize_records(
        read_records(data), "prompt_completion", tokenizer, 64, "error", "train"
    )
    batch = default_batch("prompt_completion", examples, tokenizer.pad_token_id)
    if objective == "sft":
        output = sft_loss(model, batch, "token")
    else:
        output = ift_loss(model, model.get_input_embeddings(), batch, 0.2, 0.95)
    output.loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 4 * 7 * 2  # 4 layers × 7 projections × (A, B)
    for name, param in lora.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


class SimpleConfig:
    def __init__(self, gradient_checkpointing):
        self.gradient_checkpointing = gradient_checkpointing


def test_merge_gives_the_logits_of_base_plus_adapter(tmp_path, model_dir, data):
    adapter = _train_adapter(tmp_path, model_dir, data)
    merged = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(adapter), "--output", str(merged)])
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[1, 5, 9, 30, 7, 2]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir), adapter
        )(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits)
    again = CliRunner().invoke(cli, ["merge", str(adapter), "--output", str(merged)])
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    onto_itself = CliRunner().invoke(
        cli, ["merge", str(adapter), "--output", str(adapter), "--overwrite"]
    )
    assert onto_itself.exit_code == 1 and "would overwrite its own input" in onto_itself.output
    assert (adapter / "adapter_model.safetensors").exists()


def test_merge_keeps_the_base_precision_and_names_a_mismatch(tmp_path, model_dir, data):
    adapter = _train_adapter(tmp_path, model_dir, data)
    bf16 = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(bf16)
    merged = tmp_path / "merged"
    args = ["merge", str(adapter), "--base", str(bf16), "--output", str(merged)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert {t.dtype for t in load_file(merged / "model.safetensors").values()} == {torch.bfloat16}
    other = tmp_path / "other-base"
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    config.hidden_size, config.intermediate_size = 64, 192
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    args = ["merge", str(adapter), "--base", str(other), "--output", str(tmp_path / "m2")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "does not fit base model" in result.output


@pytest.mark.parametrize("objective", ["kto", "minorsft", "ift"])
def test_lora_composes_with_every_objective(tmp_path, model_dir, data, objective, write_jsonl):
    if objective == "kto":
        rows = [json.loads(x) for x in data.read_text().splitlines()]
        data = write_jsonl(
            tmp_path / "kto.jsonl", [{**r, "label": i % 2 == 0} for i, r in enumerate(rows)]
        )
    out = tmp_path / "out"
    _run(
        "--objective",
        objective,
        "--lora",
        "--set",
        "lora.r=4",
        "--set",
        "lora.target_modules=[q_proj, v_proj]",
        "--model",
        model_dir,
        "--data",
        data,
        "--max-steps",
        2,
        "--batch-size",
        4,
        "--lr",
        1e-2,
        "--output-dir",
        out,
    )
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    weights = load_file(out / "final" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it trained
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _rows(out))
    if objective != "ift":
        assert _reference_info(out)["mode"] == "adapter"


def test_four_bit_is_refused_on_cpu(tmp_path, model_dir, data):
    if torch.cuda.is_available():
        pytest.skip("4-bit is allowed on CUDA")
    result = _run(
        "--model",
        model_dir,
        "--data",
        data,
        "--lora",
        "--load-in-4bit",
        "--output-dir",
        tmp_path / "o",
        expect=1,
    )
    assert "--load-in-4bit (QLoRA) needs a CUDA GPU" in result.output


def test_lora_flags_are_in_run_help():
    text = CliRunner().invoke(cli, ["run", "--help"]).output
    for flag in ("--lora", "--adapter", "--load-in-4bit"):
        assert flag in text


def test_without_the_plugin_the_flags_say_what_to_install(monkeypatch):
    monkeypatch.setenv(plugins.PLUGINS_ENV, "align-plugin-sft")
    result = CliRunner().invoke(cli, ["run", "--lora"])
    assert result.exit_code == 2 and "pip install align-plugin-lora" in result.output
    result = CliRunner().invoke(cli, ["run", "--set", "lora.r=4"])
    assert result.exit_code == 1 and "pip install align-plugin-lora" in result.output
