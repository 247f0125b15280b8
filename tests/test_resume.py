"""Checkpoints and --resume: a resumed run is the same run, for every first-party objective;
a checkpoint that exists is complete whatever killed the process; SIGINT/SIGTERM save and exit;
a resumed run must be the run that was interrupted."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import align
from align import plugins
from align.cli import cli
from align.loop.resume import complete_checkpoints


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(directory):
    name = "adapter_model.safetensors"
    return load_file(
        str(directory / (name if (directory / name).exists() else "model.safetensors"))
    )


def _crash_copy(done, target, checkpoint_step, logged_up_to):
    """What a run killed after step ``logged_up_to`` leaves: ``done``'s directory without its
    final model and later checkpoints, its metrics cut there with a half-written line."""
    shutil.copytree(done, target)
    shutil.rmtree(target / "final")
    for step, path in complete_checkpoints(target):
        if step > checkpoint_step:
            shutil.rmtree(path)
    rows = [r for r in _rows(done) if r["step"] <= logged_up_to]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "lo'
    (target / "metrics.jsonl").write_text(text)
    info = json.loads((target / "run.json").read_text())
    info["status"] = "running"
    (target / "run.json").write_text(json.dumps(info))


def _assert_same_run(a, b, after, minimum=20):
    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    compared = 0
    for x, y in zip(rows_a, rows_b, strict=True):
        assert x.keys() == y.keys()
        if x["step"] > after:
            for key, value in x.items():
                assert y[key] == pytest.approx(value, abs=1e-6, rel=0), (x["step"], key)
                compared += 1
    assert compared >= minimum
    wa, wb = _weights(a / "final"), _weights(b / "final")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6, rtol=0), name


def _data(objective, tmp_path, write_jsonl, sft_rows):
    rows = sft_rows + [
        {"prompt": "What is 9 + 9? ", "completion": "18."},
        {"prompt": "Hi ", "completion": "Hello."},
    ]
    if objective == "dpo":
        rows = [
            {"prompt": r["prompt"], "chosen": r["completion"], "rejected": " No idea."}
            for r in rows
        ]
    if objective == "kto":
        rows = [{**r, "label": i % 3 != 0} for i, r in enumerate(rows)]
    return write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", rows[:3])


CASES = {
    "sft": [],
    "dpo": [],  # precomputed reference, the cache deleted before the resume
    "kto": ["--reference", "model"],
    "minorsft": [],
    "ift": [],
    "lora-sft": [],  # LoRA dropout draws random numbers: the RNG state must be restored
}


@pytest.mark.parametrize("objective", list(CASES))
def test_resumed_run_equals_uninterrupted_run(
    objective, tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch
):
    """Ten examples, batch 2, two micro-batches a step: 3 steps an epoch, so the 7 steps cross
    two epoch boundaries. Checkpoint at step 3 with metric sums pending (logged every 2)."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    data, eval_data = _data(objective, tmp_path, write_jsonl, sft_rows)
    args = ["--objective", objective, "--model", model_dir, "--data", data]
    args += ["--eval-data", eval_data, "--eval-every", "2", "--log-every", "2", "--lr", "1e-2"]
    args += ["--batch-size", "2", "--grad-accum", "2", "--max-steps", "7", "--save-every", "3"]
    args += CASES[objective]
    _run(*args, "--output-dir", tmp_path / "a")
    assert [s for s, _ in complete_checkpoints(tmp_path / "a")] == [3, 6]

    _crash_copy(tmp_path / "a", tmp_path / "b", checkpoint_step=3, logged_up_to=4)
    if objective == "dpo":
        shutil.rmtree(tmp_path / "cache")  # the reference is scored again from the start weights
    result = _run(*args, "--output-dir", tmp_path / "b", "--resume")
    assert "Resuming at step 3 of 7" in result.output
    _assert_same_run(tmp_path / "a", tmp_path / "b", after=3)
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed"][0]["from_step"] == 3


def test_resume_from_a_given_checkpoint_and_keep_last(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    args = ["--model", model_dir, "--data", data, "--batch-size", "2", "--lr", "1e-2"]
    args += ["--max-steps", "6", "--save-every", "1", "--keep-last", "2"]
    _run(*args, "--output-dir", tmp_path / "a")
    assert [s for s, _ in complete_checkpoints(tmp_path / "a")] == [4, 5]

    _crash_copy(tmp_path / "a", tmp_path / "b", checkpoint_step=5, logged_up_to=5)
    checkpoint = tmp_path / "b" / "checkpoints" / "step-4"  # not the newest: a given path
    result = _run(*args, "--keep-last", "3", "--resume", checkpoint)
    assert "Resuming at step 4 of 6" in result.output
    assert "later checkpoints set aside: abandoned-step-5" in result.output
    _assert_same_run(tmp_path / "a", tmp_path / "b", after=4, minimum=10)
    assert [s for s, _ in complete_checkpoints(tmp_path / "b")] == [4, 5]
    abandoned = tmp_path / "b" / "checkpoints" / "abandoned-step-5"
    assert (abandoned / "trainer_state.json").exists()
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["resumed"][0]["changed"] == {"keep_last": [2, 3]}
    assert info["config"]["keep_last"] == 3
    running = {"status": "running", "written_by": "align-core"}
    (tmp_path / "b" / "run.json").write_text(json.dumps(running))
    assert "abandoned-step-N are not resumed" in _run(*args, "--resume", abandoned, expect=1).output


def test_a_resumed_run_must_be_the_same_run(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "out"
    args = ["--model", model_dir, "--data", data, "--max-steps", "4", "--save-every", "2"]
    _run(*args, "--output-dir", out)
    result = _run(*args, "--output-dir", out, "--resume", expect=1)
    assert "already completed" in result.output

    _crash_copy(out, tmp_path / "b", checkpoint_step=2, logged_up_to=2)
    b = ["--output-dir", tmp_path / "b", "--resume"]
    result = _run(*args, "--lr", "1e-3", *b, expect=1)
    assert "lr: was 2e-05, now 0.001" in result.output
    write_jsonl(data, sft_rows[:6])
    result = _run(*args, *b, expect=1)
    assert "train data: its content changed" in result.output
    result = _run(*args, *b, "--overwrite", expect=1)
    assert "pick one" in result.output
    result = _run(*args, "--resume", expect=1)
    assert "--resume needs --output-dir" in result.output
    result = _run(*args, "--output-dir", tmp_path / "b", expect=1)
    assert "continue it with --resume" in result.output

    fresh = tmp_path / "fresh"
    _run(*args[:-2], "--output-dir", fresh)  # no --save-every: no checkpoint to resume from
    (fresh / "run.json").write_text(json.dumps({"status": "running", "written_by": "align-core"}))
    result = _run(*args, "--output-dir", fresh, "--resume", expect=1)
    assert "holds no complete checkpoint" in result.output
    result = _run(*args, "--resume", tmp_path / "nowhere", expect=1)
    assert "expected a checkpoint directory named step-N" in result.output
    result = _run(*args, "--resume", tmp_path / "b" / "checkpoints" / "step-9", expect=1)
    assert "not a complete checkpoint" in result.output


# -- killed processes and signals -------------------------------------------------------------
KILL_ON_SECOND_STATE_SAVE = """
import os, signal, sys
import accelerate
save_state = accelerate.Accelerator.save_state
calls = []
def killing_save_state(self, *args, **kwargs):
    result = save_state(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint is half written: model and state, no manifest
        os.kill(os.getpid(), signal.SIGKILL)
    return result
accelerate.Accelerator.save_state = killing_save_state
from align.cli import cli
cli.main(args=sys.argv[1:], prog_name="align")
"""


def _env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE": str(tmp_path / "cache")}


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(
    tmp_path, model_dir, write_jsonl, sft_rows
):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    args = ["run", "--model", model_dir, "--data", data, "--batch-size", "2", "--lr", "1e-2"]
    args += ["--max-steps", "6", "--save-every", "2"]
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_ON_SECOND_STATE_SAVE, *map(str, args), "--output-dir", killed],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "checkpoints" / ".step-4.tmp").is_dir()  # the half-written one
    assert [s for s, _ in complete_checkpoints(killed)] == [2]

    result = _run(*args[1:], "--output-dir", killed, "--resume")
    assert "Resuming at step 2 of 6" in result.output
    assert not (killed / "checkpoints" / ".step-4.tmp").exists()
    _run(*args[1:], "--output-dir", tmp_path / "whole")
    _assert_same_run(tmp_path / "whole", killed, after=2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_exits(sig, tmp_path, model_dir, write_jsonl, sft_rows):
    """The stop comes before the step's evaluation (a preemption notice gives little time);
    the resumed run evaluates first, so every step still has its evaluation row."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    eval_data = write_jsonl(tmp_path / "e.jsonl", sft_rows[:2])
    out = tmp_path / "out"
    args = ["run", "--model", model_dir, "--data", data, "--batch-size", "2", "--lr", "1e-2"]
    args += ["--max-steps", "100", "--eval-data", eval_data, "--eval-every", "1"]
    args += ["--output-dir", out]
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.cli", *map(str, args)],
        env=_env(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(_rows(out)) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert "Resume with the same command and --resume" in stderr and "Traceback" not in stderr
    ((step, checkpoint),) = complete_checkpoints(out)
    assert _rows(out)[-1]["step"] == step < 100
    assert "eval_loss" not in _rows(out)[-1]  # stopped before evaluating
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["stopped_at_step"] == step
    assert set(os.listdir(checkpoint / "state")) == {
        "optimizer.bin",
        "random_states_0.pkl",
        "scheduler.pt",
    }
    _run(*args[1:], "--resume")
    rows = _rows(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 101))
    assert [r["step"] for r in rows if "eval_loss" in r] == list(range(1, 101))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and "stopped_at_step" not in info


def test_an_ignored_signal_stays_ignored():
    from align.loop.stopping import StopSignals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopSignals(announce=False):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_restoring_a_model_saved_in_another_layout(tmp_path):
    """transformers saves mixture-of-experts weights in another layout than it holds them in
    memory; restoring a checkpoint of one goes through from_pretrained's conversion."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from align.loop.resume import restore_weights

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    torch.manual_seed(0)
    trained = MixtralForCausalLM(config)
    trained.save_pretrained(tmp_path, state_dict=trained.state_dict())
    torch.manual_seed(1)
    fresh = MixtralForCausalLM(config)
    restore_weights(fresh, tmp_path)
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


# -- non-finite values ------------------------------------------------------------------------
def _poisoned_data(write_jsonl, tmp_path, sft_rows):
    rows = list(sft_rows)
    rows[2] = {"prompt": "What is ~? ", "completion": "A tilde."}  # line 3
    return write_jsonl(tmp_path / "d.jsonl", rows)


def test_a_nan_loss_stops_the_run_naming_step_and_example(
    tmp_path, poisoned_model_dir, write_jsonl, sft_rows
):
    data = _poisoned_data(write_jsonl, tmp_path, sft_rows)
    out = tmp_path / "out"
    args = ["--model", poisoned_model_dir, "--data", data, "--batch-size", "1", "--lr", "1e-3"]
    result = _run(*args, "--save-every", "1", "--output-dir", out, expect=1)
    info = json.loads((out / "run.json").read_text())
    step = info["failed_at_step"]
    assert f"step {step}: the loss is nan" in result.output
    assert f"{data}: line 3." in result.output and "Traceback" not in result.output
    assert info["status"] == "failed" and info["failure"] == "non-finite loss"
    if step > 1:
        last_good = out / "checkpoints" / f"step-{step - 1}"
        assert f"The last good checkpoint is {last_good}" in result.output
        weights = _weights(last_good)
        assert all(torch.isfinite(w).all() for n, w in weights.items() if "embed" not in n)
    assert [s for s, _ in complete_checkpoints(out)] == list(range(1, step))
    assert not (out / "final").exists()


def test_skipping_non_finite_steps_counts_them(tmp_path, poisoned_model_dir, write_jsonl, sft_rows):
    data = _poisoned_data(write_jsonl, tmp_path, sft_rows)
    out = tmp_path / "out"
    args = ["--model", poisoned_model_dir, "--data", data, "--batch-size", "1", "--lr", "1e-3"]
    result = _run(*args, "--epochs", "2", "--on-nonfinite", "skip", "--output-dir", out)
    assert result.output.count("the loss is nan; step skipped") == 2  # once an epoch
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["skipped_steps"] == 2
    rows = _rows(out)
    assert len(rows) == 16 and rows[-1]["skipped_steps"] == 2
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN logged
    weights = _weights(out / "final")
    assert all(torch.isfinite(w).all() for n, w in weights.items() if "embed_tokens" not in n)


class NanGradient:
    """An objective whose loss is finite (0) and whose gradient is not: d√u/du at u = 0."""

    __name__ = "nan-gradient"

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="nan-gradient", description="test"))

    @align.hookimpl
    def align_compute_loss(self, model, batch):
        logps = align.forward_logps(model, batch).sums
        return align.LossOutput(loss=torch.sqrt((logps * 0).sum()), count=len(logps))


def test_a_non_finite_gradient_with_a_finite_loss_is_caught(
    tmp_path, model_dir, write_jsonl, sft_rows
):
    plugins.reset_registry(plugins.load_plugins(extra=[NanGradient()]))
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows[:2])
    args = ["--objective", "nan-gradient", "--model", model_dir, "--data", data]
    result = _run(*args, "--batch-size", "2", "--output-dir", tmp_path / "out", expect=1)
    assert "step 1: the gradient is nan (not finite)" in result.output
    assert f"Examples in this step's batch: {data}: line 1, line 2." in result.output
    assert "No checkpoint was written before it" in result.output


def test_a_kill_between_the_two_renames_of_a_replacement_is_finished(tmp_path):
    """replace_dir renames the old directory aside, then the new one into place; a kill in
    between leaves neither in place. The clean-up finishes the replacement; a checkpoint
    that was only half written is deleted."""
    from align.loop.resume import remove_partial_checkpoints

    root = tmp_path / "checkpoints"
    for name, step in ((".step-4.old", 3), (".step-4.tmp", 4), (".step-6.tmp", 6)):
        (root / name / "state").mkdir(parents=True)
        (root / name / "trainer_state.json").write_text(json.dumps({"step": step}))
    (root / ".step-2.trash").mkdir()
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-4"]
    assert json.loads((root / "step-4" / "trainer_state.json").read_text()) == {"step": 4}


def test_a_changed_reference_is_refused():
    from align.errors import ConfigError
    from align.loop.resume import check_reference

    saved = {"mode": "precomputed", "cache_keys": {"train": "abc", "eval": "def"}}
    check_reference(saved, {"mode": "precomputed", "cache_keys": {"train": "abc"}})  # eval may go
    check_reference({"mode": "model", "cache_keys": None}, {"mode": "model", "cache_keys": None})
    with pytest.raises(ConfigError, match="cache key abc → xyz"):
        check_reference(saved, {"mode": "precomputed", "cache_keys": {"train": "xyz"}})


def test_a_run_started_before_an_option_existed_resumes(tmp_path, model_dir, write_jsonl, sft_rows):
    """Options added since (here the on-policy ones) are absent from the older run.json: at
    their defaults they change nothing, so the run resumes; set otherwise, it is refused."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    args = ["--model", model_dir, "--data", data, "--max-steps", "4", "--save-every", "2"]
    _run(*args, "--output-dir", tmp_path / "a")
    _crash_copy(tmp_path / "a", tmp_path / "b", checkpoint_step=2, logged_up_to=2)
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    for key in ("eval_on_start", "rewards", "generator", "temperature", "max_completion_length"):
        del info["config"][key]
    (tmp_path / "b" / "run.json").write_text(json.dumps(info))
    result = _run(*args, "--output-dir", tmp_path / "b", "--resume")
    assert "Resuming at step 2 of 4" in result.output
    _crash_copy(tmp_path / "a", tmp_path / "c", checkpoint_step=2, logged_up_to=2)
    info = json.loads((tmp_path / "c" / "run.json").read_text())
    del info["config"]["eval_on_start"]
    (tmp_path / "c" / "run.json").write_text(json.dumps(info))
    result = _run(*args, "--output-dir", tmp_path / "c", "--resume", "--eval-on-start", expect=1)
    assert "eval_on_start: was None, now True" in result.output
