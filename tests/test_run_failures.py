"""Every failure is one clear line and leaves run.json `failed` with the reason, never
`running`: a full disk while writing a checkpoint or the final model (a real one, a small
tmpfs), and an error in each phase of the run. The directory's lock is let go either way."""

import contextlib
import json
import os
import signal
import subprocess

import pytest
from click.testing import CliRunner

from align.cli import cli
from align.loop import train
from align.loop.resume import complete_checkpoints
from align.loop.rundir import RunLock


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


@pytest.fixture
def base(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    return ["--model", model_dir, "--data", data, "--batch-size", "2", "--lr", "1e-2"]


@contextlib.contextmanager
def small_disk(path, megabytes):
    """A real file system of ``megabytes`` at ``path`` (root only)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_during_a_checkpoint_is_said_in_words(tmp_path, base):
    """The tiny model's checkpoint is about 11 MB: step-2 fits in 16 MB, step-4 does not."""
    args = [*base, "--max-steps", "6", "--save-every", "2"]
    with small_disk(tmp_path / "disk", 16) as disk:
        out = disk / "run"
        result = _run(*args, "--output-dir", out, expect=1)
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("Error: no space left on tmpfs at ")
        assert "writing checkpoint step-4 (needs ~11." in last
        assert "checkpoint step-2 is intact; free space and --resume" in last
        assert "Traceback" not in result.output
        assert not (out / "checkpoints" / ".step-4.tmp").exists()  # removed: its space is free
        assert [s for s, _ in complete_checkpoints(out)] == [2]
        info = json.loads((out / "run.json").read_text())
        assert info["status"] == "failed" and info["failure"] == last[len("Error: ") :]
        assert info["failed_at_step"] == 4
        assert RunLock(out).holder_if_held() is None
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        result = _run(*args, "--output-dir", out, "--resume")
        assert "Resuming at step 2 of 6" in result.output
        assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_a_full_disk_during_the_final_save_is_said_in_words(tmp_path, base):
    """The final model is about 3.7 MB; 2 MB holds the run's logs but not it."""
    with small_disk(tmp_path / "disk", 2) as disk:
        out = disk / "run"
        result = _run(*base, "--max-steps", "2", "--output-dir", out, expect=1)
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("Error: no space left on tmpfs at ")
        assert "writing the final model (needs ~3." in last
        assert "no checkpoint to resume from; free space and run again" in last
        assert not (out / ".final.tmp").exists() and not (out / "final").exists()
        info = json.loads((out / "run.json").read_text())
        assert info["status"] == "failed" and "no space left" in info["failure"]


class Boom(RuntimeError):
    pass


PHASES = ["train_step", "log_metrics", "evaluate", "_write_checkpoint", "save_final", "start"]


@pytest.mark.parametrize("phase", PHASES)
def test_a_failure_in_any_phase_leaves_run_json_failed(phase, tmp_path, base, monkeypatch):
    real = getattr(train.Training, phase)

    def failing(self, *args, **kwargs):
        if phase == "start":  # after run.json says "running"
            real(self, *args, **kwargs)
            raise Boom(f"{phase} broke")
        if phase == "save_final" or self.run.step >= 2:
            raise Boom(f"{phase} broke")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(train.Training, phase, failing)
    out = tmp_path / "out"
    args = [*base, "--max-steps", "4", "--save-every", "2", "--eval-every", "1"]
    eval_data = base[base.index("--data") + 1]
    args += ["--eval-data", eval_data, "--output-dir", out]
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert isinstance(result.exception, Boom)  # a bug keeps its traceback
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed", info
    assert info["failure"] == f"Boom: {phase} broke"
    assert RunLock(out).holder_if_held() is None


def test_a_full_disk_anywhere_is_said_in_words(tmp_path, base, monkeypatch):
    real = train.MetricsLog.write

    def full(self, row):
        if row["step"] >= 3:
            raise OSError(28, "No space left on device")
        return real(self, row)

    monkeypatch.setattr(train.MetricsLog, "write", full)
    args = [*base, "--max-steps", "4", "--save-every", "1", "--log-every", "1"]
    result = _run(*args, "--output-dir", tmp_path / "out", expect=1)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: no space left on ") and "writing to " in last
    assert "checkpoint step-2 is intact; free space and --resume" in last
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["status"] == "failed" and info["failure"].startswith("no space left on ")


def test_a_signal_while_the_run_starts_stops_it_with_a_checkpoint(tmp_path, base, monkeypatch):
    """From the moment run.json says "running", a signal stops the run after a step with a
    checkpoint: it is never left "running" with nothing to resume."""
    real = train.Training.start

    def start_then_signal(self):
        real(self)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train.Training, "start", start_then_signal)
    out = tmp_path / "out"
    result = _run(*base, "--max-steps", "50", "--output-dir", out, expect=128 + signal.SIGTERM)
    assert "stopped after step 1 of 50" in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["stopped_at_step"] == 1
    assert [s for s, _ in complete_checkpoints(out)] == [1]


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"owns": None}, "not listed as the old run's"),  # --overwrite deletes nothing
        ({"owns": 5}, "'owns' is 5, not what align writes there"),
        ({"owns": "final"}, "'owns' is 'final', not what align writes there"),
        ({"config": [1]}, "'config' is [1], not what align writes there"),
        ({"resumed": {}}, "'resumed' is {}, not what align writes there"),
        ({"seconds": "abc"}, "'seconds' is 'abc', not what align writes there"),
        ({"engine": 5}, "'engine' is 5, not what align writes there"),
    ],
)
def test_a_run_json_edited_out_of_shape_is_one_line(edit, message, tmp_path, base):
    out = tmp_path / "out"
    args = [*base, "--max-steps", "4", "--save-every", "2"]
    _run(*args, "--output-dir", out)
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, **edit, "status": "running"}))
    for extra in (["--overwrite"], ["--resume"]):
        if extra == ["--resume"] and "owns" in edit:  # a record without owns resumes
            continue
        result = _run(*args, "--output-dir", out, *extra, expect=1)
        assert result.output.splitlines()[-1].startswith("Error: "), result.output
        assert message in result.output
    assert (out / "final" / "model.safetensors").exists()  # nothing deleted
