"""--push-to-hub REPO: the repository id checked before anything runs, final/ uploaded once
the run completed (up to the call: the hub is unreachable here), and a failed upload told
in words with nothing lost."""

import json

import huggingface_hub
import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi

from align.cli import cli
from align.loop.rundir import Busy, RunLock


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


@pytest.fixture
def args(tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows)
    return ["--model", model_dir, "--data", data, "--max-steps", "1", "--report-to", "none"]


def test_final_is_uploaded_once_the_run_completed(args, tmp_path, monkeypatch):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        info = json.loads((tmp_path / "run" / "run.json").read_text())
        assert info["status"] == "completed"  # the run is recorded before the upload starts
        with pytest.raises(Busy):  # and still holds its directory: no run clears final/ now
            RunLock(tmp_path / "run").acquire()
        final = tmp_path / "run" / "final"
        sealed = json.loads((final / "manifest.json").read_text())["files"]
        assert sorted(p.name for p in final.iterdir()) == sorted([*sealed, "manifest.json"])
        return huggingface_hub.CommitInfo(
            commit_url="https://huggingface.co/me/tiny/commit/abc",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="abc",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    result = _run(*args, "--output-dir", out, "--push-to-hub", "me/tiny", "--hub-private")
    assert [c[:2] for c in calls] == [("create_repo", "me/tiny"), ("upload_folder", "me/tiny")]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    upload = calls[1][2]
    assert upload["folder_path"] == out / "final"
    assert upload["commit_message"] == "align: sft run run (1 step)"
    assert "Pushed final/ to the hub: https://huggingface.co/me/tiny/commit/abc" in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["hub"]["commit"] == "https://huggingface.co/me/tiny/commit/abc"
    assert "hf_not_a_real_token" not in result.output + (out / "run.json").read_text()


def test_an_unreachable_hub_loses_nothing(args, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refused
    out = tmp_path / "run"
    result = _run(*args, "--output-dir", out, "--push-to-hub", "me/tiny", expect=1)
    assert "Error: could not push final/ to the hub repository me/tiny: " in result.output
    assert "(hub: http://127.0.0.1:9)" in result.output
    assert f"the model is saved at {out / 'final'}" in result.output
    assert f"push it later with `hf upload me/tiny {out / 'final'}`" in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["hub"]["repo"] == "me/tiny" and "Connect" in info["hub"]["error"]
    verify = CliRunner().invoke(cli, ["verify", str(out)])
    assert verify.exit_code == 0 and "final: intact" in verify.output, verify.output


def test_a_push_that_cannot_happen_is_refused_before_training(args, tmp_path, monkeypatch):
    result = _run(*args, "--push-to-hub", "me/tiny/extra", expect=1)
    assert "--push-to-hub" in result.output and "not a hub repository id" in result.output
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "run"
    result = _run(*args, "--push-to-hub", "me/tiny", "--output-dir", out, expect=1)
    assert "no Hugging Face token: log in with `hf auth login`" in result.output
    assert not out.exists()  # nothing trained, nothing left
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = _run(*args, "--push-to-hub", "me/tiny", "--output-dir", out, expect=1)
    assert "HF_HUB_OFFLINE is set" in result.output
