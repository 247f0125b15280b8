"""What a run shows on the console: significant digits on the progress bar, a line per
evaluation, a closing summary; and the test processes' thread count."""

import json
import os
import subprocess
import sys

import torch
from click.testing import CliRunner

from align.cli import cli
from align.loop.metrics import format_value, headline


def test_values_keep_four_significant_digits():
    assert format_value(1.2345e-6) == "1.234e-06"  # a DPO loss near 0 is not 0.0000
    assert format_value(0.693147) == "0.6931"
    assert format_value(6.12345) == "6.123"
    assert format_value(0.75) == "0.75"
    assert format_value(0.0) == "0"


def test_headline_is_the_loss_and_the_objectives_known_metrics():
    dpo = {
        "eval_loss": 0.64213,
        "eval_rewards/chosen": 0.1,
        "eval_rewards/margins": 0.25,
        "eval_rewards/accuracies": 0.75,
        "eval_logps/chosen": -12.0,
    }
    assert headline(dpo, "eval_") == "loss 0.6421, rewards/accuracies 0.75, rewards/margins 0.25"
    sft = {"eval_loss": 0.4, "eval_mean_token_accuracy": 0.9012, "eval_deviation": -0.1}
    assert headline(sft, "eval_") == "loss 0.4, mean_token_accuracy 0.9012, deviation -0.1"
    # an objective with none of the known metrics shows its first few, by name
    other = {"eval_loss": 1.0, "eval_d": 4.0, "eval_c": 3.0, "eval_b": 2.0, "eval_a": 1.0}
    assert headline(other, "eval_") == "loss 1, a 1, b 2, c 3"
    grpo = {"eval_loss": 0.01, "eval_clip_ratio/low_mean": 0.0, "eval_reward": 0.5,
            "eval_rewards/addition/mean": 0.25, "eval_rewards/addition/std": 0.4}  # fmt: skip
    assert headline(grpo, "eval_") == "loss 0.01, reward 0.5, rewards/addition/mean 0.25"


def test_a_run_prints_each_evaluation_and_a_summary(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "run"
    args = ["run", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data)]
    args += ["--max-steps", "4", "--eval-every", "2", "--batch-size", "4", "--lr", "1e-3"]
    result = CliRunner().invoke(cli, [*args, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    evals = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [2, 4]
    lines = result.stderr.splitlines()
    printed = [line[line.index("eval step") :] for line in lines if "eval step" in line]
    assert printed == [
        f"eval step {row['step']}: loss {format_value(row['eval_loss'])}, "
        f"mean_token_accuracy {format_value(row['eval_mean_token_accuracy'])}"
        for row in evals
    ]
    # the progress bar's last loss, with significant digits
    assert f"loss={format_value(train[-1]['loss'])}" in result.stderr
    summary = lines[-1]
    assert summary.startswith("Done in ") and ", 4 steps." in summary
    assert f"Train loss {format_value(train[-1]['loss'])} (step 4)." in summary
    assert f"Eval (step 4): {printed[-1].split(': ', 1)[1]}." in summary
    assert summary.endswith(f"Model: {out / 'final'}; metrics: {out / 'metrics.jsonl'}")


def test_test_processes_run_one_thread_unless_told_otherwise():
    """tests/conftest.py: `pytest -n 2` must not run two workers of a thread per core each."""
    assert "OMP_NUM_THREADS" in os.environ  # conftest sets it when the user did not
    threads = int(os.environ["OMP_NUM_THREADS"])
    assert torch.get_num_threads() == threads
    code = "import os; print(os.environ.get('OMP_NUM_THREADS'))"  # torch reads it at start
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.stdout.strip() == str(threads), child.stderr
