import json

import pytest
from click.testing import CliRunner

import align_alpaca
from align.cli import cli
from align.testing import FormatConformance, registered


class TestAlpacaFormat(FormatConformance):
    """The format's samples are of its shape and train on their outputs, the columns identify
    it, and a sample missing one is an error that names its line."""

    format = "alpaca"
    plugin = align_alpaca


def test_the_template_with_and_without_input():
    assert align_alpaca.render_prompt("Add.", "1 + 2") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 + 2\n\n### Response:\n"
    )
    assert align_alpaca.render_prompt("Say hello.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hello.\n\n### Response:\n"
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from align import demo

    path = tmp_path_factory.mktemp("model")
    demo.build_demo_model(path)
    return path


def _inspect(model, tmp_path, rows):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with registered(align_alpaca):  # the installed sft objective reads the format
        args = ["inspect", "--objective", "sft", "--model", str(model), "--data", str(data)]
        return CliRunner().invoke(cli, [*args, "-n", "1"])


def test_records_are_read_through_the_template(model, tmp_path):
    """A null input renders the template without one; the output and EOS are trained; a column
    nothing reads is reported."""
    from transformers import AutoTokenizer

    rows = [{"instruction": "Say hello.", "input": None, "output": "Hello!", "source": "web"}]
    result = _inspect(model, tmp_path, rows)
    assert result.exit_code == 0, result.output
    text = align_alpaca.render_prompt("Say hello.") + "Hello!"
    tokens = len(AutoTokenizer.from_pretrained(model)(text)["input_ids"]) + 1  # and EOS
    assert f"sequence ({tokens} tokens, " in result.output
    assert "trained text: 'Hello!</s>'" in result.output
    assert "ignored columns: source" in result.output


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "Say hello."}, "line 1, field 'output': missing field"),
        ({"instruction": "", "output": "Hi."}, "line 1, field 'instruction'"),
        (
            {"instruction": "Say hello.", "input": 3, "output": "Hi."},
            "field 'input': expected a string",
        ),
        ({"instruction": "Say hello.", "output": ""}, "line 1, field 'output': is empty"),
    ],
)
def test_bad_records_name_their_line_and_field(model, tmp_path, row, message):
    result = _inspect(model, tmp_path, [row])
    assert result.exit_code == 1
    assert message in result.output, result.output
