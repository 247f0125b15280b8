"""``align inspect`` shows tokens with their loss masks; ``align plot`` draws a run's curves."""

import json

from click.testing import CliRunner

from align.cli import cli
from align.tools.plot import make_figure, run_title, spans_decades


def test_inspect_shows_tokens_masks_special_tokens_and_truncation(
    tmp_path, model_dir, write_jsonl, sft_rows, tokenizer
):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    args = ["inspect", "--model", str(model_dir), "--data", str(data), "-n", "1"]
    result = CliRunner().invoke(cli, [*args, "--max-length", "12", "--truncation", "keep_end"])
    assert result.exit_code == 0, result.output
    assert "8 records → 8 examples; 8 truncated" in result.output
    assert "=== example 1" in result.output and "=== example 2" not in result.output
    lines = [line for line in result.output.splitlines() if line[:5].strip().isdigit()]
    assert len(lines) == 12  # one line per token of the (cut) sequence
    trained = [line for line in lines if " TRAIN " in line]
    assert trained and f"{tokenizer.eos_token!r}" in trained[-1] and "<special>" in trained[-1]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1 +", "chosen": " 2", "rejected": " 3"}])
    args = ["inspect", "--objective", "dpo", "--model", str(model_dir), "--data", str(pairs)]
    result = CliRunner().invoke(cli, args)
    assert "--- chosen (" in result.output and "--- rejected (" in result.output
    args = ["inspect", "--objective", "grpo", "--model", str(model_dir), "--data", "demo"]
    result = CliRunner().invoke(cli, args)  # prompts to sample from: nothing trained yet
    assert result.exit_code == 0, result.output
    assert "data format prompt_only" in result.output and " 0 trained)" in result.output
    assert "'answer': 42.0" in result.output and "'assistant'" in result.output


def test_plot_writes_a_png_of_the_curves(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "run"
    args = ["run", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data)]
    args += ["--max-steps", "3", "--eval-every", "2", "--output-dir", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    result = CliRunner().invoke(cli, ["plot", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n{oops\n")
    result = CliRunner().invoke(cli, ["plot", str(out), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "metrics.jsonl, line 2: invalid JSON" in result.output
    empty = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert empty.exit_code == 1 and "no metrics.jsonl" in empty.output


def test_plot_names_the_run_and_puts_a_loss_spanning_decades_on_a_log_scale(tmp_path):
    assert spans_decades([0.69, 0.1, 2e-6]) and spans_decades([100.0, 1.0])
    assert not spans_decades([6.1, 0.4]) and not spans_decades([99.0, 1.0])
    assert not spans_decades([1.0, 1e-6, -0.5]) and not spans_decades([])  # not all positive
    run = tmp_path / "dpo-run"
    run.mkdir()
    assert run_title(run) == "dpo-run"  # no run.json
    (run / "run.json").write_text(json.dumps({"objective": "dpo", "preset": None}))
    rows = [{"step": 1, "loss": 0.6931, "rewards/margins": 0.0}, {"step": 2, "loss": 1.5e-6}]
    rows.append({"step": 2, "eval_loss": 3e-6, "eval_rewards/margins": 9.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figure = make_figure(run)
    loss, margins = (axis for axis in figure.axes if axis.get_visible())
    assert [text.get_text() for text in figure.texts] == ["dpo-run (dpo)"]  # the suptitle
    assert (loss.get_title(), loss.get_yscale()) == ("loss", "log")
    assert (margins.get_title(), margins.get_yscale()) == ("rewards/margins", "linear")
    (run / "run.json").write_text(json.dumps({"objective": "sft", "preset": "lora-sft"}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 6.1}) + "\n")
    figure = make_figure(run)
    assert [text.get_text() for text in figure.texts] == ["dpo-run (lora-sft)"]
    assert figure.axes[0].get_yscale() == "linear"
