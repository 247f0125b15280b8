"""Checkpoints by default: every --save-minutes (10) minutes of training, the newest two kept,
none after the last step; --save-every N keeps every one; --save-every 0 writes none; a run
killed by SIGKILL with the default settings resumes from the default checkpoint exactly."""

import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from test_resume import _assert_same_run, _env, _rows

from align.cli import cli
from align.loop.checkpoint_schedule import CheckpointSchedule
from align.loop.resume import complete_checkpoints
from align.options import TrainConfig

ONE = SimpleNamespace(num_processes=1, is_main_process=True)


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_default_interval_is_ten_minutes_of_training_and_keeps_two():
    clock = Clock()
    schedule = CheckpointSchedule(TrainConfig(), clock)
    assert schedule.keep_last == 2
    clock.now += 599
    assert not schedule.due(5, 100, ONE)
    clock.now += 1
    assert schedule.due(6, 100, ONE)
    assert not schedule.due(100, 100, ONE)  # the last step: final/ follows, not a checkpoint
    schedule.restart()  # a checkpoint was written
    assert not schedule.due(7, 100, ONE)
    clock.now += 600
    assert schedule.due(8, 100, ONE)
    assert not CheckpointSchedule(TrainConfig(save_every=0), clock).due(8, 100, ONE)
    off = CheckpointSchedule(TrainConfig(save_every=0), clock)
    clock.now += 10**6
    assert not any(off.due(step, 100, ONE) for step in range(1, 101))
    assert CheckpointSchedule(TrainConfig(keep_last=5), clock).keep_last == 5
    every = CheckpointSchedule(TrainConfig(save_every=3), clock)
    assert every.keep_last is None  # all kept, as before checkpoints were on by default
    assert [s for s in range(1, 11) if every.due(s, 10, ONE)] == [3, 6, 9]
    short = CheckpointSchedule(TrainConfig(save_minutes=0.5), clock)
    clock.now += 29
    assert not short.due(1, 10, ONE)
    clock.now += 1
    assert short.due(2, 10, ONE)


def test_an_interval_in_steps_and_in_minutes_together_is_an_error():
    result = _run("--save-every", 0, "--save-minutes", 1, expect=1)
    assert "--save-every and --save-minutes: checkpoint every N steps or every M minutes" in (
        result.output
    )
    result = _run("--save-minutes", 0, expect=1)
    assert "--save-minutes: option 'save_minutes': Input should be greater than 0" in result.output


@pytest.mark.parametrize(
    "flags, kept",
    [
        (["--save-minutes", 1e-9], [3, 4]),  # due after every step: the newest two kept
        (["--save-minutes", 1e-9, "--keep-last", 3], [2, 3, 4]),
        (["--save-every", 1], [1, 2, 3, 4]),  # --save-every N keeps every one
    ],
)
def test_which_checkpoints_a_run_keeps(flags, kept, tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "out"
    _run("--model", model_dir, "--data", data, "--max-steps", 5, "--batch-size", 2, *flags,
         "--output-dir", out)  # fmt: skip
    assert [step for step, _ in complete_checkpoints(out)] == kept  # none after step 5
    assert (out / "final" / "model.safetensors").is_file()


def test_a_default_run_killed_by_sigkill_resumes_from_its_default_checkpoint(
    tmp_path, model_dir, write_jsonl, sft_rows
):
    """The interval shortened to 0.1 s; killed once its first checkpoint exists; --resume (with
    another interval: that may change) ends where a run never killed ends."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    args = ["--model", model_dir, "--data", data, "--batch-size", 2, "--lr", 1e-2]
    args += ["--max-steps", 40]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.cli", "run", *map(str, args), "--save-minutes", "0.002",
         "--output-dir", str(killed)],
        env=_env(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not complete_checkpoints(killed):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()
    step = complete_checkpoints(killed)[-1][0]
    assert step < 40

    result = _run(*args, "--save-minutes", 5, "--output-dir", killed, "--resume")
    resumed_at = int(result.output.split("Resuming at step ")[1].split()[0])
    assert step <= resumed_at < 40
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["resumed"][0]["changed"] == {"save_minutes": [0.002, 5.0]}
    _run(*args, "--output-dir", tmp_path / "whole")
    _assert_same_run(tmp_path / "whole", killed, after=resumed_at, minimum=5)
    assert [r["step"] for r in _rows(killed) if "loss" in r] == list(range(1, 41))


@pytest.mark.xdist_group("torchrun")  # torchrun's rendezvous port: one launch at a time
def test_two_processes_agree_on_the_time_based_checkpoint(
    tmp_path, model_dir, write_jsonl, sft_rows
):
    """The main process's clock decides and every process saves at that step: each
    checkpoint holds both processes' random states, and the run does not hang."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "out"
    args = ["run", "--model", model_dir, "--data", data, "--batch-size", 2, "--max-steps", 3]
    args += ["--save-minutes", 1e-9, "--output-dir", out, "--num-processes", 2]
    result = subprocess.run(
        [sys.executable, "-m", "align.cli", *map(str, args)],
        env=_env(tmp_path),
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    kept = complete_checkpoints(out)
    assert [step for step, _ in kept] == [1, 2]
    for _, path in kept:
        states = {p.name for p in (path / "state").iterdir()}
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= states, states
