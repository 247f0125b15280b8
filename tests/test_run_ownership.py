"""align writes only into directories it owns, one run at a time: a non-empty folder that holds
no align run is refused with or without --overwrite; --overwrite deletes what the old run's
record lists and nothing else, and refuses a run.json align did not write; a second run, or a
--resume of a live run, is refused with the holder's pid and host; a --resume started while a
stopped run is still saving waits for it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from align.cli import cli
from align.loop.rundir import LOCK, RunLock


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


@pytest.fixture
def base(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    return ["--model", model_dir, "--data", data, "--batch-size", "2", "--max-steps", "2"]


def _user_folder(path):
    """A folder of the user's, with names a run would write."""
    (path / "final").mkdir(parents=True)
    (path / "final" / "thesis.tex").write_text("mine")
    (path / "metrics.jsonl").write_text('{"mine": 1}\n')
    (path / "checkpoints").mkdir()
    (path / "logs").mkdir()
    (path / "logs" / "notes.txt").write_text("mine")
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_that_holds_no_run_is_refused_and_untouched(tmp_path, base, overwrite):
    home = tmp_path / "home"
    before = _user_folder(home)
    result = _run(*base, "--output-dir", home, *overwrite, expect=1)
    assert "is not empty and holds no align run" in result.output
    assert "final/" in result.output and "metrics.jsonl" in result.output
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == before  # no lock either
    assert (home / "final" / "thesis.tex").read_text() == "mine"
    assert (home / "metrics.jsonl").read_text() == '{"mine": 1}\n'


def test_overwrite_refuses_a_run_json_align_did_not_write(tmp_path, base):
    other = tmp_path / "other"
    before = _user_folder(other)
    (other / "run.json").write_text(json.dumps({"status": "running", "epochs": 3}))
    before.append("run.json")
    result = _run(*base, "--output-dir", other, "--overwrite", expect=1)
    assert "run.json was not written by align" in result.output
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == sorted(before)
    (other / "run.json").write_text("[1, 2")  # not even JSON
    assert "cannot be read" in _run(*base, "--output-dir", other, "--overwrite", expect=1).output


def test_an_empty_folder_is_used_and_overwrite_deletes_only_what_the_run_wrote(tmp_path, base):
    out = tmp_path / "empty"
    out.mkdir()
    _run(*base, "--output-dir", out)
    info = json.loads((out / "run.json").read_text())
    assert info["written_by"].startswith("align-core ")
    entries = {"run.json", "metrics.jsonl", "train.log", "final", "checkpoints", "logs", LOCK}
    assert set(info["owns"]) == entries
    (out / "notes.txt").write_text("added by the user after the run")
    old_final = (out / "final" / "model.safetensors").stat().st_mtime_ns
    _run(*base, "--output-dir", out, "--overwrite")
    assert (out / "notes.txt").read_text() == "added by the user after the run"
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns != old_final
    info = json.loads((out / "run.json").read_text())
    info["owns"] = [name for name in info["owns"] if name != "logs"]  # as if it never wrote logs
    (out / "run.json").write_text(json.dumps(info))
    result = _run(*base, "--output-dir", out, "--overwrite", expect=1)
    assert f"--overwrite: {out / 'logs'} is not listed as the old run's" in result.output
    assert (out / "final" / "model.safetensors").exists()  # nothing was deleted


def test_links_planted_under_aligns_names_are_never_written_through(tmp_path, base):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in (LOCK, ".write-test-x", "run.json"):
        planted = tmp_path / f"planted{len(name)}"
        planted.mkdir()
        (planted / name).symlink_to(victim)
        result = _run(*base, "--output-dir", planted, expect=1)
        assert str(planted) in result.output and "Traceback" not in result.output
        assert victim.read_text() == "precious", name


# -- one run per directory -----------------------------------------------------------------------
SLOW_SAVE = """
import sys, time
import accelerate
save_state = accelerate.Accelerator.save_state
def slow_save_state(self, *args, **kwargs):
    time.sleep(3)  # a big model's checkpoint: the save takes a while
    return save_state(self, *args, **kwargs)
accelerate.Accelerator.save_state = slow_save_state
from align.cli import cli
cli.main(args=sys.argv[1:], prog_name="align")
"""


def _start(tmp_path, args, out, name="run", slow_save=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE": str(tmp_path / "cache")}
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    program = ["-c", SLOW_SAVE] if slow_save else ["-m", "align.cli"]
    return subprocess.Popen(
        [sys.executable, *program, "run", *map(str, args), "--output-dir", str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _wait_for_metrics(proc, out):
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)


def test_a_live_run_keeps_its_directory_and_a_stopping_one_is_waited_for(tmp_path, base):
    args = [*base[:-1], "600", "--save-every", "1000", "--log-every", "1", "--lr", "1e-3"]
    out = tmp_path / "live"
    proc = _start(tmp_path, args, out, slow_save=True)
    try:
        _wait_for_metrics(proc, out)
        for extra in ([], ["--overwrite"], ["--resume"]):
            result = _run(*args, "--output-dir", out, *extra, expect=1)
            assert f"pid {proc.pid} on {socket.gethostname()}" in result.output, result.output
            assert "still running" in result.output
            assert "--resume" not in result.output  # not while the run lives
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 60
        while RunLock(out).holder().get("state") != "stopping":  # told at once, saving now
            assert time.time() < deadline
            time.sleep(0.01)
        result = _run(*args, "--output-dir", out, "--resume")  # at once: waits for the save
        assert "waiting for the run that is saving its checkpoint" in result.output
        assert "Resuming at step" in result.output
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and len(info["resumed"]) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 601))  # one run wrote them: never interleaved


def test_two_runs_started_together_get_the_directory_once(tmp_path, base):
    args = [*base[:-1], "30", "--save-every", "10", "--log-every", "1"]
    out = tmp_path / "together"
    procs = [_start(tmp_path, args, out, name=f"run-{i}") for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"run-{i}.log").read_text() for i in range(2)]
    assert sorted(codes) == [0, 1], logs
    refused = logs[codes.index(1)]
    assert "is in use by another align run" in refused, refused
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_a_killed_run_needs_no_clean_up(tmp_path, base):
    args = [*base[:-1], "4000", "--save-every", "3", "--log-every", "1"]
    out = tmp_path / "killed"
    proc = _start(tmp_path, args, out)
    try:
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob("step-*")):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.kill()
    proc.wait(timeout=60)
    assert RunLock(out).holder_if_held() is None  # the kernel let go of it
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert "it was killed" in result.output
    other = [*base[:-1], "5", "--save-every", "3", "--log-every", "1"]
    result = _run(*other, "--output-dir", out, "--resume", expect=1)  # past the lock, to
    assert "max_steps: was 4000, now 5" in result.output  # the options' check
