"""Option values are finite numbers, and a boolean is not a number: ``align.Options`` refuses
NaN, infinities and ``true`` for a number where the value is given (core options, objectives',
sections', rewards' options, reward weights and record fields), naming where it came from,
while the strings YAML and ``--set`` give (``1e-3``) still parse."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from pydantic import Field, ValidationError

import align
from align.cli import cli
from align.config import resolve
from align.data.fields import validate_columns
from align.data.records import read_records
from align.errors import ConfigError, DataError
from align.plugins import get_registry

FINITE = "Input should be a finite number"


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def _refused(flags=None, sets=None, config=None):
    with pytest.raises(ConfigError) as err:
        resolve(get_registry(), config, flags or {}, sets or [])
    return str(err.value)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"lr": math.inf}, f"--lr: option 'lr': {FINITE} (got inf)"),
        ({"lr": math.nan}, f"--lr: option 'lr': {FINITE} (got nan)"),
        (
            {"max_grad_norm": math.inf},
            f"--max-grad-norm: option 'max_grad_norm': {FINITE} (got inf)",
        ),
        (
            {"objective": "grpo", "temperature": math.inf},
            f"--temperature: option 'temperature': {FINITE} (got inf)",
        ),
    ],
    ids=["lr-inf", "lr-nan", "max-grad-norm-inf", "temperature-inf"],
)
def test_a_non_finite_core_flag_is_refused(flags, expected):
    assert _refused(flags) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("max_steps: true\n", "option 'max_steps': expected an integer, got a boolean (true)"),
        ("epochs: false\n", "option 'epochs': expected an integer, got a boolean (false)"),
        ("warmup_ratio: true\n", "option 'warmup_ratio': expected a number, got a boolean (true)"),
        ("lr: .nan\n", f"option 'lr': {FINITE} (got nan)"),
        ("temperature: .inf\nobjective: grpo\n", f"option 'temperature': {FINITE} (got inf)"),
    ],
    ids=["int-true", "int-false", "float-true", "nan", "inf"],
)
def test_a_bad_number_in_a_config_file_names_the_file(tmp_path, text, expected):
    path = _yaml(tmp_path, text)
    assert _refused(config=path) == f"{path}: {expected}"


def test_numbers_written_as_yaml_strings_still_parse_and_booleans_do_not(tmp_path):
    """PyYAML reads ``1e-3`` as a string; pydantic's lax mode turns it into a float."""
    spec = resolve(get_registry(), _yaml(tmp_path, "lr: 1e-3\nmax_steps: 3.0\n"))
    assert spec.config.lr == 0.001 and spec.config.max_steps == 3
    spec = resolve(get_registry(), None, {"objective": "dpo"}, ["beta=1e-3", "label_smoothing=0"])
    assert spec.options.beta == 0.001
    assert "expected a number, got a boolean (true)" in _refused(
        {"objective": "dpo"}, ["beta=true"]
    )


@pytest.mark.parametrize(
    "flags, sets, expected",
    [
        (
            {"objective": "dpo"},
            ["beta=.inf"],
            f"--set beta=.inf: options of objective 'dpo': option 'beta': {FINITE} (got inf)",
        ),
        (
            {"objective": "dpo"},
            ["beta=nan"],
            f"--set beta=nan: options of objective 'dpo': option 'beta': {FINITE} (got 'nan')",
        ),
        (
            {"objective": "ift"},
            ["lambda=-.inf"],
            f"--set lambda=-.inf: options of objective 'ift': option 'lambda': {FINITE}",
        ),
        (
            {"objective": "grpo"},
            ["num_generations=true"],
            "--set num_generations=true: options of objective 'grpo': option 'num_generations': "
            "expected an integer, got a boolean (true)",
        ),
        (
            {"objective": "grpo"},
            ["epsilon_high=inf"],
            "option 'epsilon_high': " + FINITE,
        ),
        (
            {},
            ["lora.alpha=inf"],
            f"--set lora.alpha=inf: section 'lora': option 'alpha': {FINITE} (got 'inf')",
        ),
        (
            {},
            ["lora.r=true"],
            "--set lora.r=true: section 'lora': option 'r': expected an integer, got a boolean "
            "(true)",
        ),
        (
            {"objective": "grpo", "rewards": ["length"]},
            ["reward.length.cache=true"],
            "--set reward.length.cache=true: options of reward 'length': option 'cache': "
            "expected an integer, got a boolean (true)",
        ),
    ],
    ids=[
        "objective-inf",
        "objective-nan",
        "alias",
        "objective-int-bool",
        "optional-float",
        "section-inf",
        "section-bool",
        "reward-option-bool",
    ],
)
def test_plugin_options_are_finite_and_not_booleans(flags, sets, expected):
    assert expected in _refused(flags, sets)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "NaN"])
def test_a_non_finite_reward_weight_is_refused(weight):
    message = _refused({"objective": "grpo", "rewards": [f"addition={weight}"]})
    assert message == (
        f"--reward: 'addition={weight}': the weight after '=' must be a finite number"
    )


def test_a_non_finite_reward_weight_in_a_config_file_names_the_file(tmp_path):
    path = _yaml(tmp_path, "objective: grpo\nrewards: {addition: .nan}\n")
    assert _refused(config=path) == (
        f"rewards ({path}): 'addition=nan': the weight after '=' must be a finite number"
    )


def test_the_command_line_refuses_non_finite_values_before_training(tmp_path):
    cases = [
        (["--lr", "inf"], f"Error: --lr: option 'lr': {FINITE} (got inf)"),
        (
            ["--objective", "grpo", "--reward", "addition", "--temperature", "inf"],
            f"Error: --temperature: option 'temperature': {FINITE} (got inf)",
        ),
        (
            ["--objective", "grpo", "--reward", "addition=nan"],
            "Error: --reward: 'addition=nan': the weight after '=' must be a finite number",
        ),
    ]
    for args, expected in cases:
        out = tmp_path / "out"
        result = CliRunner().invoke(cli, ["run", *args, "--output-dir", str(out)])
        assert result.exit_code == 1 and expected in result.output, (args, result.output)
        assert not out.exists()


class ThirdParty(align.Options):
    """A third-party plugin's options: it subclasses align.Options and declares nothing more."""

    scale: float = 1.0
    cap: float | None = None
    steps: int = Field(1, ge=0)
    enabled: bool = False
    names: str | list[str] = "all"


def test_a_plugins_own_options_get_the_rules_from_align_options():
    options = ThirdParty(scale="1e-3", cap=2, steps="3", enabled=True, names="x")
    assert (options.scale, options.cap, options.steps, options.enabled) == (0.001, 2.0, 3, True)
    for values in (
        {"scale": math.nan},
        {"scale": "inf"},
        {"cap": -math.inf},
        {"scale": True},
        {"cap": False},
        {"steps": True},
    ):
        with pytest.raises(ValidationError):
            ThirdParty(**values)
    with pytest.raises(ValidationError, match=FINITE):
        options.scale = math.inf  # assignment is validated too
    with pytest.raises(ValidationError, match="expected an integer, got a boolean"):
        options.steps = False


class WeightFields(align.Fields):
    weight: float = 1.0
    count: int = 0


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"weight": NaN}', f"field 'weight': {FINITE} (got float nan)"),
        ('{"weight": Infinity}', f"field 'weight': {FINITE} (got float inf)"),
        ('{"weight": true}', "field 'weight': expected a number, got bool True"),
        ('{"count": false}', "field 'count': expected an integer, got bool False"),
    ],
    ids=["nan", "inf", "float-bool", "int-bool"],
)
def test_a_bad_number_in_a_record_names_file_line_and_field(tmp_path, line, expected):
    path = tmp_path / "train.jsonl"
    path.write_text('{"weight": 0.5}\n' + line + "\n")
    first, second = read_records(path)
    assert validate_columns(first, WeightFields)["weight"] == 0.5
    with pytest.raises(DataError) as err:
        validate_columns(second, WeightFields)
    assert str(err.value) == f"{path}, line 2, {expected}"


def test_a_csv_cell_that_reads_as_nan_is_refused(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("weight\n0.5\nnan\n")
    first, second = read_records(path)
    assert validate_columns(first, WeightFields)["weight"] == 0.5
    with pytest.raises(DataError, match=rf"line 3, field 'weight': {FINITE}"):
        validate_columns(second, WeightFields)


def test_the_addition_rewards_answer_must_be_finite():
    from align.rollout.rewards import AdditionFields

    record = align.Record({"answer": math.nan}, "train.jsonl", "line 4")
    with pytest.raises(DataError, match=rf"train.jsonl, line 4, field 'answer': {FINITE}"):
        validate_columns(record, AdditionFields)


def test_a_ranked_records_scores_must_be_finite():
    from align.data.formats import RankedRecord

    record = align.Record(
        {"prompt": "p", "completions": ["a", "b"], "scores": [1.0, math.nan]}, "r.jsonl", "line 2"
    )
    with pytest.raises(DataError, match=rf"r.jsonl, line 2, field 'scores\[1\]': {FINITE}"):
        validate_columns(record, RankedRecord)
