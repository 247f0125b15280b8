"""Every model that scores packed batches is probed, the reference model too: one that cannot
take them makes the run (``--reference model``) or the reference pass (``precomputed``) pad,
says so, and scores what a padded run scores."""

import json

import pytest
import torch
from click.testing import CliRunner

from align.cli import cli


@pytest.fixture(scope="module")
def sliding_reference_dir(model_dir, tmp_path_factory):
    """A reference with the policy's tokenizer and a 4-token sliding window: a packed batch's
    custom mask would replace the window (its packed log-probs are 0.40 off on tests'
    sequences), so it must never score one."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    path = tmp_path_factory.mktemp("sliding-reference")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=4,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(3)
    MistralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def pairs(tmp_path, write_jsonl):
    rows = [
        {
            "prompt": f"What is {a} + {b}? Think it over. ",
            "chosen": f"{a} + {b} = {a + b}, as anyone can check.",
            "rejected": f"It is {a + b + 1}.",
        }
        for a, b in [(1, 2), (10, 20), (3, 4), (7, 30)]
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def _dpo(out, model_dir, data, *extra):
    args = ["run", "--objective", "dpo", "--model", model_dir, "--data", data]
    args += ["--output-dir", out, "--max-steps", "2", "--batch-size", "4", *extra]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output + repr(result.exception)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result.output, json.loads((out / "run.json").read_text()), losses


def test_a_reference_model_that_cannot_pack_makes_the_run_pad(
    tmp_path, model_dir, sliding_reference_dir, pairs
):
    flags = ["--reference", "model", "--ref-model", sliding_reference_dir]
    output, run, losses = _dpo(tmp_path / "default", model_dir, pairs, *flags)
    assert (
        "padding_free: off, the reference model has sliding-window attention; batches are padded"
        in output
    )
    assert run["packed_batches"] is False
    _, padded_run, padded = _dpo(tmp_path / "padded", model_dir, pairs, *flags, "--no-padding-free")
    assert padded_run["packed_batches"] is False
    assert losses == pytest.approx(padded, abs=1e-6)


def test_a_ref_model_that_cannot_pack_makes_the_precomputed_pass_pad(
    tmp_path, model_dir, sliding_reference_dir, pairs, monkeypatch
):
    """The policy still trains on packed batches: the pass's values are looked up by sequence,
    whatever the layout of the batch that asks for them."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache-default"))
    flags = ["--ref-model", sliding_reference_dir]
    output, run, losses = _dpo(tmp_path / "default", model_dir, pairs, *flags)
    assert (
        "padding_free: off for the reference pass, the reference model has sliding-window "
        "attention; it scores padded batches" in output
    )
    assert run["packed_batches"] is True
    assert run["reference"]["splits"]["train"]["packed"] is False
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache-padded"))
    _, _, padded = _dpo(tmp_path / "padded", model_dir, pairs, *flags, "--no-padding-free")
    assert losses == pytest.approx(padded, abs=1e-5)


def test_a_reference_model_that_can_pack_keeps_the_run_packed(tmp_path, model_dir, pairs):
    output, run, _ = _dpo(tmp_path / "o", model_dir, pairs, "--reference", "model")
    assert "padding_free: off" not in output
    assert run["packed_batches"] is True
