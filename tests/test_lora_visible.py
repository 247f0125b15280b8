"""LoRA runs look like LoRA runs: the banner names the preset or the section switched on
(``lora-sft``, ``dpo + LoRA``) and every run's trainable share, the summary calls an adapter an
adapter, and the default run folder is ``runs/dpo-lora-<time>``."""

import re

import pytest
from click.testing import CliRunner
from test_lora import KeepModel  # keeps the model the loss saw

from align import plugins
from align.cli import cli
from align.loop.describe import trainable_share


@pytest.mark.parametrize(
    "objective, title, folder, provider, saved",
    [
        (["--objective", "lora-sft"], "lora-sft", "lora-sft", "align-plugin-sft", "Adapter"),
        (["--objective", "dpo", "--lora"], "dpo + LoRA", "dpo-lora", "align-plugin-dpo", "Adapter"),
        (["--objective", "sft"], "sft", "sft", "align-plugin-sft", "Model"),
    ],
)
def test_the_banner_summary_and_folder_name_what_is_trained(
    tmp_path, monkeypatch, model_dir, sft_rows, write_jsonl, sft_pairs,
    objective, title, folder, provider, saved,
):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    data = sft_pairs if "dpo" in objective else write_jsonl(tmp_path / "d.jsonl", sft_rows)
    keep = KeepModel()
    plugins.reset_registry(plugins.load_plugins(extra=[keep]))
    args = ["run", *objective, "--model", str(model_dir), "--data", str(data)]
    result = CliRunner().invoke(cli, [*args, "--batch-size", "4", "--max-steps", "1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    (out,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(rf"{re.escape(folder)}-\d{{8}}-\d{{6}}", out.name), out.name
    lines = result.stderr.splitlines()
    banner = next(i for i, line in enumerate(lines) if line.startswith("Training "))
    assert lines[banner].startswith(f"Training {title} ({provider}) for 1 steps on ")
    params = list(keep.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    assert lines[banner + 1] == trainable_share(trainable, total)
    if saved == "Adapter":
        assert 0 < trainable < total and (out / "final" / "adapter_config.json").exists()
    else:
        assert trainable == total and lines[banner + 1].endswith("parameters (100%)")
    relative = out.relative_to(tmp_path)
    assert lines[-1].endswith(f" {saved}: {relative / 'final'}; metrics: {relative}/metrics.jsonl")


def test_the_trainable_share_reads_as_a_count():
    assert trainable_share(1_234_567, 124_000_000) == (
        "trainable: 1.23M of 124M parameters (1.00%)"
    )
    assert trainable_share(908_000, 908_000) == "trainable: 908K of 908K parameters (100%)"
    assert trainable_share(12, 7_000_000_000) == "trainable: 12 of 7B parameters (0.0000%)"


@pytest.mark.parametrize(
    "flags, sections, title, name",
    [
        ({"objective": "sft"}, {}, "sft", "sft"),
        ({"objective": "lora-sft"}, {}, "lora-sft", "lora-sft"),
        ({"objective": "dpo"}, {"lora": {"enabled": True}}, "dpo + LoRA", "dpo-lora"),
        ({"objective": "dpo"}, {"lora": {"adapter": "runs/a/final"}}, "dpo + LoRA", "dpo-lora"),
        ({"objective": "kto"}, {"lora": {"enabled": False}}, "kto", "kto"),
    ],
)
def test_a_run_is_named_after_its_preset_or_the_sections_switched_on(flags, sections, title, name):
    from align.config import resolve
    from align.loop.describe import run_name, run_title
    from align.plugins import get_registry

    registry = get_registry()
    spec = resolve(registry, flags=flags, section_flags=sections)
    assert (run_title(spec, registry), run_name(spec, registry)) == (title, name)
