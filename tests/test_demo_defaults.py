"""The demo's defaults are named in a run's first lines when they apply (options the user set
win), with which part of the demo they are for; a model and data of one's own get the general
defaults, and no such line."""

import pytest
from click.testing import CliRunner

from align.cli import cli
from align.config import resolve
from align.loop.setup import apply_demo_defaults
from align.plugins import get_registry

DEMO = "--batch-size 16, --epochs 4, --warmup-steps 10, --lr-scheduler cosine, --eval-every 50"


def _note(**flags):
    registry = get_registry()
    spec = resolve(registry, None, flags)
    apply_demo_defaults(spec, registry)
    return spec.demo_note


@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, f"Demo defaults for the demo (options you set win): --lr 3e-3, {DEMO}, "),
        ({"model": "demo"}, "Demo defaults for the demo (options you set win): --lr 3e-3"),
        ({"lr": 0.1, "max_length": 32}, f"for the demo (options you set win): {DEMO}\n"),
        ({"model": "demo", "data": "DATA"}, "for the demo model on your data (options you set "),
        ({"model": "MODEL", "data": "demo"}, "Demo defaults for the demo data (options you"),
    ],
)
def test_the_demo_defaults_a_run_takes_are_named(given, expected, model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1 + 1? ", "completion": "2."}\n')
    values = {k: {"DATA": str(data), "MODEL": str(model_dir)}.get(v, v) for k, v in given.items()}
    note = _note(**values)
    assert expected in note + "\n", note
    assert note.endswith("--max-length 64") == ("max_length" not in given)
    assert ("--lr 3e-3" in note) == ("lr" not in given)


def test_on_policy_demo_defaults_are_named_too():
    note = _note(objective="grpo")
    assert "--lr 3e-4, --batch-size 64" in note and "--max-steps 300" in note
    assert "--eval-on-start on" in note and "--max-completion-length 16" in note


def test_a_model_and_data_of_ones_own_take_the_general_defaults(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1 + 1? ", "completion": "2."}\n')
    assert _note(model=str(model_dir), data=str(data)) is None


def test_the_run_prints_the_line(model_dir, tmp_path, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    args = ["run", "--model", "demo", "--data", data, "--max-steps", 1, "--lr", "0.01"]
    result = CliRunner().invoke(cli, [*map(str, args), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert f"Demo defaults for the demo model on your data (options you set win): {DEMO}" in (
        result.output
    )
    own = ["run", "--model", model_dir, "--data", data, "--max-steps", 1]
    result = CliRunner().invoke(cli, [*map(str, own), "--output-dir", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "Demo defaults" not in result.output


def test_demo_small_is_a_smaller_demo_model_with_the_same_tokenizer(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from align import demo

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    registry = get_registry()
    spec = resolve(registry, None, {"model": "demo-small"})
    apply_demo_defaults(spec, registry)
    assert "Demo defaults for the demo (options you set win)" in spec.demo_note
    small, full = demo.demo_model_path("demo-small"), demo.demo_model_path()
    assert spec.config.model == str(small) and small != full
    small_config, full_config = AutoConfig.from_pretrained(small), AutoConfig.from_pretrained(full)
    assert (small_config.num_hidden_layers, small_config.hidden_size) == (2, 64)
    assert (full_config.num_hidden_layers, full_config.hidden_size) == (4, 128)
    assert AutoTokenizer.from_pretrained(small).get_vocab() == (
        AutoTokenizer.from_pretrained(full).get_vocab()
    )
