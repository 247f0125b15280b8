"""The bad-input corpus (tests/bad_inputs/): every broken file, run through ``align run``, is
answered with an error naming file, record and field, or a counted warning; never a traceback
and never a silent drop. Data is checked before the model is loaded."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from align.cli import cli

CORPUS = Path(__file__).with_name("bad_inputs")

DATA_ERRORS = [
    ("empty.jsonl", "sft", ": contains no records"),
    ("invalid_json.jsonl", "sft", ", line 2: invalid JSON: Expecting ',' delimiter"),
    ("not_an_object.jsonl", "sft", ", line 2: expected a JSON object, got list"),
    ("missing_field.jsonl", "sft", ", line 2, field 'completion': missing field"),
    ("wrong_type.jsonl", "sft", ", line 2, field 'prompt': expected a string, got int"),
    ("empty_completion.jsonl", "sft", ", line 2, field 'completion': is empty"),
    ("label_not_boolean.jsonl", "kto", ", line 2, field 'label': expected a boolean"),
    ("missing_rejected.jsonl", "dpo", ", line 1, field 'rejected': missing field"),
    ("not_utf8.jsonl", "sft", ", line 2: is not valid UTF-8"),
    ("unknown_role.jsonl", "sft", ", line 1, field 'messages[1].role': unknown role 'robot'"),
    (
        "message_without_content.jsonl",
        "sft",
        ", line 1, field 'messages[0].content': expected a string",
    ),
    ("missing_column.csv", "sft", ", line 2, field 'completion': missing field"),
    ("no_such_file.jsonl", "sft", ": no such file or directory"),
]


def _run(args):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result


@pytest.mark.parametrize("name, objective, expected", DATA_ERRORS)
def test_broken_data_files(name, objective, expected, tmp_path, model_dir, monkeypatch):
    import align.loop.setup

    def no_model(*args, **kwargs):  # the data is refused before any model is loaded
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(align.loop.setup, "load_pretrained", no_model)
    path = CORPUS / name
    result = _run(
        ["--objective", objective, "--model", model_dir, "--data", path]
        + ["--output-dir", tmp_path / "out"]
    )
    assert result.exit_code == 1
    assert f"Error: {path}{expected}" in result.output


def test_a_prompt_longer_than_max_length_is_counted_or_refused(tmp_path, model_dir):
    path = CORPUS / "prompt_too_long.jsonl"
    common = ["--model", model_dir, "--data", path, "--max-length", "64", "--max-steps", "1"]
    result = _run([*common, "--output-dir", tmp_path / "a"])
    assert result.exit_code == 0
    assert "2 records → 1 examples; 1 skipped (no completion tokens within max_length)" in (
        result.output
    )
    report = json.loads((tmp_path / "a" / "run.json").read_text())["data"]["train"]
    assert report["skipped"] == {"no completion tokens within max_length": 1}
    result = _run([*common, "--truncation", "error", "--output-dir", tmp_path / "b"])
    assert result.exit_code == 1
    assert f"{path}, line 2: is 490 tokens long, over max_length 64 (truncation=error)" in (
        result.output
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "unknown_key.yaml",
            ": unknown key 'learning_rat'. Did you mean 'learning_rate' (align's 'lr')?",
        ),
        (
            "unknown_option.yaml",
            ": options of objective 'sft': unknown option 'normalisation'. "
            "Did you mean 'normalization'?",
        ),
        ("wrong_type.yaml", ": option 'max_steps': Input should be a valid integer"),
    ],
)
def test_broken_config_files(name, expected, tmp_path):
    path = CORPUS / name
    result = _run(["--config", path, "--output-dir", tmp_path / "out"])
    assert result.exit_code == 1
    assert f"Error: {path}{expected}" in result.output
    assert not (tmp_path / "out").exists()
