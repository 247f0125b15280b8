"""A run's directory and exit, whatever happens around it: a stop through a pipe whose reader
died saves and exits cleanly; runs started in the same second never share a directory; a run
that fails before training leaves nothing behind; files honour the umask."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from align.cli import cli
from align.errors import ConfigError
from align.loop import setup
from align.loop.resume import complete_checkpoints, find_checkpoint
from align.loop.stopping import StopSignals


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


# -- a stop through a pipe --------------------------------------------------------------------
READER = """
import os, signal
signal.signal(signal.SIGINT, lambda *_: os._exit(0))  # as `tee` does on Ctrl-C
while os.read(0, 1 << 16):
    pass
"""


def test_ctrl_c_through_a_pipe_saves_and_exits(tmp_path, model_dir, write_jsonl, sft_rows):
    """`align run 2>&1 | tee log`, then Ctrl-C: the terminal's SIGINT stops `tee` too, so
    every later write to stdout and stderr fails (EPIPE). The run still saves, records that it
    was interrupted and exits with 130. The reader is stopped first, so that even the signal
    handler's own notice meets the closed pipe."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "out"
    args = ["run", "--model", model_dir, "--data", data, "--batch-size", "2", "--lr", "1e-2"]
    args += ["--max-steps", "2000", "--save-every", "1000", "--log-every", "1"]
    args += ["--output-dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE": str(tmp_path / "cache")}
    read_end, write_end = os.pipe()
    reader = subprocess.Popen([sys.executable, "-c", READER], stdin=read_end)
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.cli", *map(str, args)],
        stdout=write_end,
        stderr=write_end,
        env=env,
    )
    os.close(read_end)
    os.close(write_end)
    try:
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"
        while not metrics.exists() or not metrics.read_text():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.02)
        reader.send_signal(signal.SIGINT)
        assert reader.wait(timeout=30) == 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 128 + signal.SIGINT
    finally:
        for process in (reader, proc):
            if process.poll() is None:
                process.kill()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted"
    ((step, checkpoint),) = complete_checkpoints(out)
    assert step == info["stopped_at_step"] < 2000
    record = json.loads((out / "run.json").read_text())
    assert find_checkpoint("latest", out, record) == (checkpoint, [])


def test_the_signal_notice_cannot_fail_on_a_closed_stderr():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: writing gives EPIPE
    saved = os.dup(2)
    os.dup2(write_end, 2)
    try:
        signals = StopSignals(announce=True)
        signals._handle(signal.SIGINT, None)
        os.close(2)  # no stderr at all: EBADF
        signals = StopSignals(announce=True)
        signals._handle(signal.SIGTERM, None)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write_end)
    assert signals.received == signal.SIGTERM


# -- the output directory ---------------------------------------------------------------------
def _config(**values):
    defaults = {"resume": None, "overwrite": False, "output_dir": None}
    return SimpleNamespace(**{**defaults, **values})


class _FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2026, 11, 29, 9, 59, 19)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(setup, "datetime", _FrozenClock)
    paths = [setup.prepare_output_dir(_config(), "sft").path for _ in range(3)]
    assert [str(p) for p in paths] == [
        os.path.join("runs", "sft-20261129-095919"),
        os.path.join("runs", "sft-20261129-095919-2"),
        os.path.join("runs", "sft-20261129-095919-3"),
    ]
    assert all(p.is_dir() for p in paths)


def _broken_model(model_dir, tmp_path):
    """The tokenizer loads, the weights do not: the run fails after reading the data."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for path in model_dir.iterdir():
        if path.suffix != ".safetensors":
            (broken / path.name).write_bytes(path.read_bytes())
    return broken


def test_a_run_that_fails_before_training_leaves_no_directory(
    tmp_path, monkeypatch, model_dir, write_jsonl, sft_rows
):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    args = ["--model", _broken_model(model_dir, tmp_path), "--data", data]
    assert "model.safetensors" in _run(*args, expect=1).output  # failed as late as that
    assert not (tmp_path / "runs").exists()
    _run(*args, "--output-dir", tmp_path / "new" / "run", expect=1)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # not the run's to remove
    _run(*args, "--output-dir", tmp_path / "mine", expect=1)
    assert (tmp_path / "mine").is_dir()


def test_resuming_a_completed_run_without_checkpoints_says_it_completed(tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "completed", "written_by": "align-core"}))
    with pytest.raises(ConfigError, match=f"the run in {out} already completed"):
        setup.prepare_output_dir(_config(resume="latest", output_dir=str(out)), "sft")
    result = _run("--resume", "--output-dir", out, expect=1)
    assert "already completed" in result.output and "--overwrite" not in result.output


# -- file modes -------------------------------------------------------------------------------
def test_a_runs_files_honour_the_umask(tmp_path, model_dir, write_jsonl, sft_rows):
    """Weights too (safetensors writes them 0600 through a temporary file): on a shared
    cluster, others read the models."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "out"
    args = ["--model", model_dir, "--data", data, "--max-steps", "2", "--save-every", "1"]
    previous = os.umask(0o022)
    try:
        _run(*args, "--batch-size", "4", "--output-dir", out)
    finally:
        os.umask(previous)
    checked = 0
    for root in (out / "final", out / "checkpoints"):
        for path in [root, *root.rglob("*")]:
            expected = 0o755 if path.is_dir() else 0o644
            assert stat.S_IMODE(path.stat().st_mode) == expected, path
            checked += 1
    assert (out / "final" / "model.safetensors").is_file() and checked > 10
