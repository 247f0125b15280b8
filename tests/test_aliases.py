"""TRL's and transformers' names on align run and in run.yaml: each alias gives the same run as
align's name for it, values converted where the meanings differ, an option given twice is an
error naming both, --help lists them in one section, typos are answered from the table, and
run.json records align's names."""

import json

import pytest
import yaml
from click.testing import CliRunner

from align.aliases import ALIASES, NO_COUNTERPART, SAME_NAMES
from align.cli import cli
from align.cli.options import split_section_flags
from align.cli.run import inspect, prepare, run
from align.config import resolve
from align.errors import ConfigError
from align.options import CORE_KEYS
from align.plugins import get_registry

# alias → (its flag's arguments, align's flags for the same run, run.yaml value of the alias)
CASES = {
    "model_name_or_path": (["org/model"], ["--model", "org/model"], "org/model"),
    "dataset_name": (["org/data"], ["--data", "org/data"], "org/data"),
    "dataset_config": (["main"], ["--data-subset", "main"], "main"),
    "dataset_train_split": (["validation"], ["--data-split", "validation"], "validation"),
    "dataset_streaming": ([], ["--streaming"], True),
    "dataset_num_proc": (["3"], ["--data-workers", "3"], 3),
    "learning_rate": (["1e-3"], ["--lr", "1e-3"], 1e-3),
    "per_device_train_batch_size": (["4"], ["--batch-size", "4"], 4),
    "gradient_accumulation_steps": (["3"], ["--grad-accum", "3"], 3),
    "num_train_epochs": (["2.0"], ["--epochs", "2"], 2.0),
    "lr_scheduler_type": (["constant_with_warmup"], ["--lr-scheduler", "constant"], "cosine"),
    "max_seq_length": (["128"], ["--max-length", "128"], 128),
    "truncation_mode": (["keep_end"], ["--truncation", "keep_end"], "keep_end"),
    "bf16": ([], ["--precision", "bf16"], True),
    "fp16": ([], ["--precision", "fp16"], True),
    "logging_steps": (["5"], ["--log-every", "5"], 5.0),
    "save_steps": (["7"], ["--save-every", "7"], 7),
    "save_total_limit": (["2"], ["--keep-last", "2"], 2),
    "eval_steps": (["3"], ["--eval-every", "3"], 3),
    "resume_from_checkpoint": ([], ["--resume"], True),
    "overwrite_output_dir": ([], ["--overwrite"], True),
    "hub_model_id": (["me/model"], ["--push-to-hub", "me/model"], "me/model"),
    "hub_private_repo": ([], ["--hub-private"], True),
}


def _spec(*args, command=run, config=None):
    """The RunSpec ``align run ARGS`` resolves, parsed by click as the command line is."""
    ctx = command.make_context(
        command.name, [*map(str, args)] + ["--config", config] * bool(config)
    )
    flags = dict(ctx.params)
    config_file, sets = flags.pop("config_file"), flags.pop("sets")
    flags.pop("count", None)
    sections = split_section_flags(flags)
    return resolve(get_registry(), config_file, flags, list(sets), sections)


def test_the_table_is_tested_whole():
    assert set(CASES) == set(ALIASES)
    assert all(alias.key in CORE_KEYS for alias in ALIASES.values())
    assert not set(ALIASES) & CORE_KEYS  # an alias never hides an align name
    assert not set(NO_COUNTERPART) & (CORE_KEYS | set(ALIASES))


@pytest.mark.parametrize("name", list(CASES))
def test_each_alias_flag_is_its_align_flag(name):
    values, align_args, _ = CASES[name]
    alias = ALIASES[name]
    by_alias, by_align = _spec(alias.flag, *values), _spec(*align_args)
    assert by_alias.as_dict() == by_align.as_dict()
    assert by_alias.config.model_fields_set == by_align.config.model_fields_set
    assert by_alias.sources == {alias.key: alias.flag}  # errors name the flag the user typed


@pytest.mark.parametrize("name", list(CASES))
def test_each_alias_is_a_run_yaml_key(name, tmp_path):
    _, _, value = CASES[name]
    alias = ALIASES[name]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({name: value}))
    converted = {"bf16": "bf16", "fp16": "fp16", "resume_from_checkpoint": "latest"}.get(
        name, int(value) if isinstance(value, float) and name != "learning_rate" else value
    )
    expected = tmp_path / "align.yaml"
    expected.write_text(yaml.safe_dump({alias.key: converted}))
    by_alias, by_align = _spec(config=config), _spec(config=expected)
    assert by_alias.as_dict() == by_align.as_dict()
    assert by_alias.sources == {alias.key: f"{config}: {name}"}


def test_inspect_and_prepare_take_the_aliases_too():
    for command in (inspect, prepare):
        spec = _spec("--learning-rate", "0.5", "--per-device-train-batch-size", 3, command=command)
        assert (spec.config.lr, spec.config.batch_size) == (0.5, 3)


def test_bf16_and_fp16_become_the_precision(tmp_path):
    def yaml_spec(values):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(values))
        return _spec(config=path)

    assert yaml_spec({"bf16": True, "fp16": False}).config.precision == "bf16"
    assert yaml_spec({"fp16": True, "bf16": False}).config.precision == "fp16"
    assert yaml_spec({"bf16": False}).config.precision == "no"  # transformers' default
    assert "precision" not in yaml_spec({"bf16": False}).config.model_fields_set
    with pytest.raises(ConfigError, match=r"run.yaml: precision and .*run.yaml: bf16 \(false\)"):
        yaml_spec({"precision": "bf16", "bf16": False})
    with pytest.raises(ConfigError, match=r"run.yaml: bf16: expected true or false, got 'yes'"):
        yaml_spec({"bf16": "yes"})
    with pytest.raises(ConfigError, match="--bf16 and --fp16 both set option 'precision'"):
        _spec("--bf16", "--fp16")


def test_an_option_given_twice_in_one_layer_is_an_error_naming_both(tmp_path):
    with pytest.raises(ConfigError, match="--lr and --learning-rate both set option 'lr'"):
        _spec("--lr", "1e-3", "--learning-rate", "1e-3")
    with pytest.raises(ConfigError, match="--resume and --resume-from-checkpoint both set"):
        _spec("--resume", "--resume-from-checkpoint")
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1.0e-3\nlearning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match=f"{config}: lr and {config}: learning_rate both set"):
        _spec(config=config)
    config.write_text("max_seq_length: 64\nmax_length: 32\n")
    with pytest.raises(ConfigError, match="max_seq_length and .*max_length both set"):
        _spec(config=config)
    # across layers the usual precedence holds: the flag wins over the file
    config.write_text("learning_rate: 1.0e-3\n")
    spec = _spec("--lr", "0.25", config=config)
    assert spec.config.lr == 0.25 and spec.sources["lr"] == "--lr"


def test_values_align_reads_otherwise_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="--num-train-epochs: 2.5: align counts whole epochs"):
        _spec("--num-train-epochs", "2.5")
    with pytest.raises(ConfigError, match="--logging-steps: 0.1: align counts whole steps"):
        _spec("--logging-steps", "0.1")
    config = tmp_path / "run.yaml"
    config.write_text("eval_steps: 0.25\n")
    with pytest.raises(ConfigError, match=f"{config}: eval_steps: 0.25: align counts whole steps"):
        _spec(config=config)
    with pytest.raises(ConfigError, match="--learning-rate: option 'lr': Input should be greater"):
        _spec("--learning-rate", "-1")
    with pytest.raises(ConfigError, match="--lr-scheduler-type: option 'lr_scheduler'"):
        _spec("--lr-scheduler-type", "polynomial")
    result = CliRunner().invoke(cli, ["run", "--set", "learning_rate=1"])
    assert "'learning_rate' is a core option; use --lr" in result.output
    for flag in ("--save-steps", "--eval-steps"):  # options that may be none: whole steps too
        with pytest.raises(ConfigError, match=f"{flag}: 0.5: align counts whole steps"):
            _spec(flag, "0.5")


def test_trl_s_push_to_hub_true_with_hub_model_id_names_the_repository(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("push_to_hub: true\nhub_model_id: me/model\n")
    assert _spec(config=config).config.push_to_hub == "me/model"
    config.write_text("push_to_hub: true\n")
    with pytest.raises(ConfigError, match="push_to_hub takes the hub repository"):
        _spec(config=config)


def test_help_lists_every_alias_in_one_section():
    for command in ("run", "inspect", "prepare"):
        text = CliRunner().invoke(cli, [command, "--help"], terminal_width=100).output
        options, _, section = text.partition("Options:")[2].partition("TRL/transformers names")
        assert section, command
        for alias in ALIASES.values():
            assert alias.flag not in options  # hidden from the option list
            shown = alias.shown or "--" + alias.key.replace("_", "-")
            assert f"{alias.flag} " in section and shown.split()[0] in section, alias.name
        for name in [*SAME_NAMES, *NO_COUNTERPART]:
            if name in CORE_KEYS or name in NO_COUNTERPART:
                assert name.replace("_", "-") in section or name in section, name


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("--learning-rat", "Did you mean --learning-rate (align's --lr)?"),
        ("--gradient-accumulation-step", "--gradient-accumulation-steps (align's --grad-accum)"),
        ("--resume-from-checkpoints", "--resume-from-checkpoint (align's --resume)"),
        ("--per-device-train-batch", "--per-device-train-batch-size (align's --batch-size)"),
        ("--eval-strategy", "no align counterpart: align evaluates every --eval-every N steps"),
        ("--lora-rank", "Did you mean --lora-r? --lora-r is TRL's"),
        ("--max-lenght", "Did you mean --max-length?"),  # an align name stays align's
    ],
)
def test_typos_are_answered_from_the_alias_table(typed, expected):
    result = CliRunner().invoke(cli, ["run", typed, "1"])
    assert result.exit_code == 2
    assert expected in result.output
    assert "--gradient-checkpointing" not in result.output


def test_run_yaml_typos_and_names_without_counterpart(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("per_device_train_batch: 4\n")
    with pytest.raises(ConfigError, match="Did you mean 'per_device_train_batch_size' \\(align"):
        _spec(config=config)
    config.write_text("eval_strategy: steps\n")
    with pytest.raises(ConfigError, match="'eval_strategy' is TRL's .* --eval-every N steps"):
        _spec(config=config)


def test_run_json_records_align_names(tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch):
    """One real run, every option by its TRL name: run.json's config holds align's names."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "out"
    args = ["run", "--model-name-or-path", model_dir, "--dataset-name", data]
    args += ["--learning-rate", "0.01", "--per-device-train-batch-size", "2"]
    args += ["--gradient-accumulation-steps", "2", "--num-train-epochs", "1.0"]
    args += ["--max-seq-length", "48", "--logging-steps", "2", "--output-dir", out]
    result = CliRunner().invoke(cli, [*map(str, args)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run.json").read_text())["config"]
    assert {k: config[k] for k in ("lr", "batch_size", "grad_accum", "epochs", "max_length")} == {
        "lr": 0.01,
        "batch_size": 2,
        "grad_accum": 2,
        "epochs": 1,
        "max_length": 48,
    }
    assert config["model"] == str(model_dir) and config["data"] == str(data)
    assert not set(config) & set(ALIASES)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2]  # 8 examples / (2 × 2) = 2 steps
