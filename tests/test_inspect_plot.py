"""``align inspect`` shows tokens with their loss masks; ``align plot`` draws a run's curves."""

import json

from click.testing import CliRunner

from align.cli import cli


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
