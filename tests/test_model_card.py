"""final/README.md is the hub's model card: YAML metadata huggingface_hub parses back (as TRL
writes it), the training config and final metrics in its body, sealed in final/'s manifest."""

import json

import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from align.cli import cli
from align.loop.model_card import model_card


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def _config_block(text):
    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_a_full_model_s_card(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows)
    eval_data = write_jsonl(tmp_path / "eval.jsonl", sft_rows[:2])
    out = tmp_path / "my-model"
    args = ["--model", model_dir, "--data", data, "--eval-data", eval_data, "--max-steps", "2"]
    _run(*args, "--batch-size", "4", "--report-to", "none", "--output-dir", out)

    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["align", "sft"]
    assert card.data.model_name == "my-model"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local directory is no hub id (as TRL leaves it out)
    assert card.data.datasets is None  # local files only
    info = json.loads((out / "run.json").read_text())
    assert _config_block(card.text) == info["config"]
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_row = [r for r in last if "loss" in r][-1]
    assert f"Training metrics at step {train_row['step']}:" in card.text
    assert f"| loss | {train_row['loss']:.4g} |" in card.text
    assert "Evaluation metrics at step 2:" in card.text
    for requirement in info["requirements"]:  # align-core and every plugin, with versions
        name, version = requirement.split("==")
        assert f"- {name}: {version}" in card.text
    # not pushed: the quick start names the run's final/ relative to the runs (no home path)
    assert f'pipeline("text-generation", model="{out.name}/final")' in card.text

    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert "README.md" in manifest["files"]
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 0 and "final: intact" in result.output, result.output
    (out / "final" / "README.md").write_text("edited")
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code != 0


def test_a_lora_adapter_s_card(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows)
    out = tmp_path / "adapter"
    args = ["--model", model_dir, "--data", data, "--max-steps", "1", "--lora"]
    _run(*args, "--report-to", "none", "--output-dir", out)

    assert (out / "final" / "adapter_config.json").exists()
    card = ModelCard.load(out / "final" / "README.md")  # align's, not the one peft writes
    assert card.data.library_name == "peft"
    assert card.data.tags == ["align", "sft", "lora"]
    assert "This is a LoRA adapter trained from" in card.text
    assert "AutoPeftModelForCausalLM.from_pretrained" in card.text
    assert _config_block(card.text)["lora"]["enabled"] is True


def test_hub_ids_become_metadata_and_local_paths_do_not(tmp_path):
    local = tmp_path / "data.jsonl"
    local.write_text("{}\n")
    details = dict(
        name="run",
        objective="dpo",
        provided_by="align-plugin-dpo 0.1.0",
        datasets=["trl-lib/ultrafeedback_binarized", str(local), "trl-lib/ultrafeedback_binarized"],
        config={"objective": "dpo", "dpo": {"beta": 0.1}},
        requirements=["align-core==0.1.0", "align-plugin-dpo==0.1.0"],
        versions={"torch": "2.5"},
        metrics={},
        steps=10,
        load_from="me/run",
    )
    card = ModelCard(model_card(model="Qwen/Qwen2.5-0.5B", adapter=True, **details))
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert card.data.library_name == "peft"
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    assert "[Qwen/Qwen2.5-0.5B](https://huggingface.co/Qwen/Qwen2.5-0.5B)" in card.text
    assert 'from_pretrained("me/run")' in card.text
    assert "No metrics were logged." in card.text
    full = ModelCard(model_card(model=str(tmp_path), adapter=False, **details))
    assert full.data.base_model is None and full.data.library_name == "transformers"
    demo = ModelCard(model_card(model=None, adapter=False, **details))
    assert "trained from align's demo model" in demo.text
