"""A damaged checkpoint never stops a resume with a traceback: each checkpoint carries a manifest
of its files' sizes and sha256, written last; --resume falls back to the newest checkpoint that
matches it, naming what it skipped; a named checkpoint that does not match is one clear error;
a file that holds code instead of tensors is refused by name; `align verify` checks them all."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from align.cli import cli
from align.errors import ConfigError
from align.loop import resume
from align.loop.manifest import MANIFEST, write_manifest

PWNED = "/tmp/align-test-pwned"


class Code:
    """What a malicious file pickles: a call that runs when it is unpickled."""

    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def _invoke(*args, expect=0):
    result = CliRunner().invoke(cli, [*map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    if expect:
        assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
        assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_dir):
    """A run of 6 steps with checkpoints at 2 and 4, and its arguments."""
    root = tmp_path_factory.mktemp("integrity")
    rows = [{"prompt": f"What is {a} + 1? ", "completion": f"{a + 1}."} for a in range(8)]
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", model_dir, "--data", data, "--batch-size", "2", "--lr", "1e-2"]
    args += ["--max-steps", "6", "--save-every", "2"]
    _invoke("run", *args, "--output-dir", root / "done")
    return root / "done", args


@pytest.fixture
def crashed(finished, tmp_path):
    """The run as a kill after step 5 leaves it: no final model, status running."""
    done, args = finished
    out = tmp_path / "crashed"
    shutil.copytree(done, out)
    shutil.rmtree(out / "final")
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "status": "running"}))
    return out, args


def _truncate(path, size=None):
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2 if size is None else size)


def _flip(path, count=64):
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        chunk = handle.read(count)
        handle.seek(-count, 1)
        handle.write(bytes(b ^ 0xFF for b in chunk))


DAMAGE = {
    "truncated weights": ("model.safetensors", _truncate, "model.safetensors has"),
    "empty weights": ("model.safetensors", lambda p: _truncate(p, 0), "model.safetensors has 0"),
    "64 flipped bytes in the weights": ("model.safetensors", _flip, "changed since it was"),
    "truncated optimizer": ("state/optimizer.bin", _truncate, "state/optimizer.bin has"),
    "missing optimizer": ("state/optimizer.bin", os.unlink, "state/optimizer.bin is missing"),
    "truncated scheduler": ("state/scheduler.pt", _truncate, "state/scheduler.pt has"),
    "missing scheduler": ("state/scheduler.pt", os.unlink, "state/scheduler.pt is missing"),
    "truncated RNG states": ("state/random_states_0.pkl", _truncate, "random_states_0.pkl has"),
    "empty trainer state": ("trainer_state.json", lambda p: p.write_text(""), "trainer_state"),
    "trainer state a list": ("trainer_state.json", lambda p: p.write_text("[]"), "trainer_state"),
    "string step": (
        "trainer_state.json",
        lambda p: p.write_text(p.read_text().replace('"step": 4', '"step": "4"')),
        "trainer_state.json has ",
    ),
    "no manifest": (MANIFEST, os.unlink, "no manifest.json"),
    "no trainer state": ("trainer_state.json", os.unlink, "trainer_state.json is missing"),
    "no state": ("state", shutil.rmtree, "state/optimizer.bin is missing"),
    "an added file": (
        "state/extra.pt",
        lambda p: p.write_bytes(b"x"),
        "state/extra.pt was not there when it was written",
    ),
    "manifest size out of range": (
        MANIFEST,
        lambda p: p.write_text('{"format": 1, "files": {"x": {"size": 1e400, "sha256": "0"}}}'),
        "manifest.json is damaged",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_saying_why(case, crashed):
    out, _args = crashed
    name, damage, reason = DAMAGE[case]
    damage(out / "checkpoints" / "step-4" / name)
    record = json.loads((out / "run.json").read_text())
    checkpoint, notes = resume.find_checkpoint("latest", out, record)
    assert checkpoint == out / "checkpoints" / "step-2"
    assert len(notes) == 1 and notes[0].startswith("skipped damaged checkpoint step-4: ")
    assert reason in notes[0], notes[0]
    with pytest.raises(ConfigError, match="the checkpoint is damaged") as error:
        resume.find_checkpoint(str(out / "checkpoints" / "step-4"), out, record)
    assert reason in str(error.value) and "--resume " + str(out / "checkpoints" / "step-2") in str(
        error.value
    )
    moved = resume.set_aside_later_checkpoints(out, 2)  # what the resumed run does with it
    assert [p.name for p in moved] == ["abandoned-step-4"]


def test_flipped_bytes_resume_from_the_intact_checkpoint_as_if_uninterrupted(finished, crashed):
    """Once, 64 flipped bytes inside the weights resumed with exit 0 and final weights off by
    2365; now the damaged step-4 is skipped and the run ends where the uninterrupted one did."""
    done, _ = finished
    out, args = crashed
    _flip(out / "checkpoints" / "step-4" / "model.safetensors")
    result = _invoke("run", *args, "--output-dir", out, "--resume")
    assert "--resume: skipped damaged checkpoint step-4: model.safetensors changed" in result.output
    assert "Resuming at step 2 of 6" in result.output
    assert "abandoned-step-4" in result.output  # set aside, not deleted
    info = json.loads((out / "run.json").read_text())
    assert "model.safetensors changed" in info["resumed"][0]["skipped"][0]
    a, b = (
        load_file(done / "final" / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_a_named_damaged_checkpoint_and_no_intact_one_are_one_line(crashed):
    out, args = crashed
    _truncate(out / "checkpoints" / "step-4" / "state" / "optimizer.bin")
    step_4 = out / "checkpoints" / "step-4"
    result = _invoke("run", *args, "--resume", step_4, expect=1)
    assert result.output.count("\n") == 1 and "the checkpoint is damaged" in result.output
    assert f"The newest intact checkpoint is {out / 'checkpoints' / 'step-2'}" in result.output
    os.unlink(out / "checkpoints" / "step-2" / "state" / "scheduler.pt")
    result = _invoke("run", *args, "--output-dir", out, "--resume", expect=1)
    assert "no checkpoint in" in result.output and "is intact" in result.output
    assert "step-2: state/scheduler.pt is missing" in result.output


def _forge(checkpoint, name, content):
    """Damage a file and write the manifest again to match it: what verification cannot see,
    loading must still say in one line."""
    path = checkpoint / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    write_manifest(checkpoint)


FORGED = {
    "trainer state a list": ("trainer_state.json", b"[]", "expected a JSON object, got list"),
    "string step": (
        "trainer_state.json",
        lambda p: p.write_text(p.read_text().replace('"step": 4', '"step": "4"')),
        "step is '4', not a count",
    ),
    "empty trainer state": ("trainer_state.json", b"", "trainer_state.json: cannot be read"),
    "truncated weights": ("model.safetensors", _truncate, "model.safetensors: "),
    "truncated optimizer": ("state/optimizer.bin", _truncate, "optimizer.bin: "),
    "optimizer with code": ("state/optimizer.bin", "code", "optimizer.bin: it holds code"),
    "RNG states with code": ("state/random_states_0.pkl", "code", "random_states_0.pkl: it holds"),
    "scheduler with code": ("state/scheduler.pt", "code", "scheduler.pt: it holds code"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_a_damaged_file_with_a_matching_manifest_is_named_in_one_line(case, crashed, tmp_path):
    out, args = crashed
    name, content, message = FORGED[case]
    checkpoint = out / "checkpoints" / "step-4"
    if content == "code":
        content = tmp_path / "code.pt"
        torch.save({"state": Code()}, content)
        content = content.read_bytes()
    _forge(checkpoint, name, content)
    if os.path.exists(PWNED):
        os.unlink(PWNED)
    result = _invoke("run", *args, "--output-dir", out, "--resume", expect=1)
    assert message in result.output, result.output
    assert result.output.splitlines()[-1].startswith("Error: ")
    if "code" in case:
        assert "refused to load " in result.output and "not tensors" in result.output
    assert not os.path.exists(PWNED)
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # never started


def test_rollouts_that_hold_code_are_refused(tmp_path):
    state = tmp_path / "step-3" / "state"
    state.mkdir(parents=True)
    torch.save([{"ids": Code()}], state / "rollouts_0.pt")
    with pytest.raises(ConfigError, match=r"refused to load .*rollouts_0.pt: it holds code"):
        resume.read_rollouts(tmp_path / "step-3", 0)
    assert not os.path.exists(PWNED)


def test_an_adapter_bin_that_holds_code_is_refused(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    args = ["--model", model_dir, "--data", data, "--max-steps", "1", "--batch-size", "2"]
    _invoke("run", "--objective", "lora-sft", *args, "--output-dir", tmp_path / "lora")
    adapter = tmp_path / "lora" / "final"
    os.unlink(adapter / "adapter_model.safetensors")
    with open(adapter / "adapter_model.bin", "wb") as handle:
        pickle.dump({"base_model.model.lm_head.weight": Code()}, handle)
    result = _invoke(
        "run", "--objective", "lora-sft", *args, "--set", f"lora.adapter={adapter}", expect=1
    )
    assert "refused to load" in result.output and "adapter_model.bin" in result.output
    assert "it holds code, not tensors" in result.output
    result = _invoke("merge", adapter, "--output", tmp_path / "merged", expect=1)
    assert "refused to load" in result.output and "it holds code, not tensors" in result.output
    assert not os.path.exists(PWNED)


def test_align_verify_checks_every_checkpoint_and_the_final_model(finished, tmp_path):
    done, _ = finished
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    result = _invoke("verify", out)
    count = _files(out / "checkpoints" / "step-2")
    assert result.output.splitlines()[1].startswith(f"  checkpoints/step-2: intact ({count} files")
    assert "completed" in result.output.splitlines()[0]
    assert [line.split(":")[0].strip() for line in result.output.splitlines()[1:]] == [
        "checkpoints/step-2",
        "checkpoints/step-4",
        "final",
    ]
    _flip(out / "final" / "model.safetensors")
    _truncate(out / "checkpoints" / "step-2" / "state" / "optimizer.bin")
    result = _invoke("verify", out, expect=1)
    lines = result.output.splitlines()
    assert lines[1].startswith("  checkpoints/step-2: DAMAGED: state/optimizer.bin has ")
    assert lines[2].startswith("  checkpoints/step-4: intact")
    assert (
        lines[3]
        == "  final: DAMAGED: model.safetensors changed since it was written (its sha256 differs)"
    )
    (out / "run.json").write_text("{}")
    assert "was not written by align" in _invoke("verify", out, expect=1).output


def _files(directory):
    return len(json.loads((directory / MANIFEST).read_text())["files"])


def test_align_verify_loads_no_torch(finished):
    """It reads files and hashes them: a second, not a torch import."""
    done, _ = finished
    code = (
        "import sys\nfrom align.cli import cli\n"
        "try:\n    cli(['verify', sys.argv[1]])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print(code, sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(done)], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stdout + result.stderr
