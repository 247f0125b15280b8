"""Argument errors come in seconds: flags, config, data paths and model paths are checked before
torch and transformers are imported, a missing model path says so, and a hub id the hub cannot
serve fails at once instead of retrying for minutes. No test here touches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from align.errors import ConfigError
from align.model import loading
from align.model.loading import check_model_source

# Runs each command line in one process and reports its exit code and stderr, then whether
# torch or transformers were imported.
RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from align.cli import cli

    results = []
    for args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                cli(args)
            except SystemExit as exc:
                results.append([exc.code, err.getvalue()])
    heavy = sorted({"torch", "transformers"} & set(sys.modules))
    print(json.dumps({"results": results, "heavy": heavy}))
    """
)


def run_in_one_process(commands, tmp_path):
    """Run the command lines in one fresh process (offline, in ``tmp_path``):
    ``{"results": [[exit code, stderr], …], "heavy": [torch/transformers if imported]}``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(commands)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_argument_errors_come_before_torch_is_imported(tmp_path, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows)
    model = tmp_path / "model"
    model.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text("lora:\n  r: 4\n")
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("lr: fast\n")
    common = ["--output-dir", str(tmp_path / "out")]
    cases = [
        (["--model", str(model), "--data", "missing.jsonl"], "Error: missing.jsonl: no such file"),
        (["--model", "./no-such-model", "--data", str(data)], "model path ./no-such-model does"),
        (["--model", "does-not/exist", "--data", str(data)], "offline mode is on (HF_HUB_OFFLINE)"),
        (
            ["--objective", "dpo", "--model", str(model), "--data", str(data)]
            + ["--ref-model", "../no-such-ref"],
            "reference model path ../no-such-ref does not exist (given by --ref-model)",
        ),
        (["--config", str(config), "--set", "lora.r=abc"], "Error: --set lora.r=abc: section"),
        (["--config", str(bad_config)], f"Error: {bad_config}: option 'lr'"),
        (["--lr", "abc"], "Invalid value for '--lr'"),
        (["--no-such-flag"], "No such option '--no-such-flag'"),
    ]
    commands = [["run", *args, *common] for args, _ in cases]
    commands.append(["inspect", "--model", str(model), "--data", "missing.jsonl"])
    report = run_in_one_process(commands, tmp_path)
    expected = [message for _, message in cases] + ["missing.jsonl: no such file or directory"]
    for command, result, message in zip(commands, report["results"], expected, strict=True):
        code, stderr = result
        assert code in (1, 2) and message in stderr and "Traceback" not in stderr, (command, stderr)
    assert report["heavy"] == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name", ["./missing", "../missing", "/no/such/model", "~/no-such-model-14", "a/b/c"]
)
def test_a_missing_model_path_is_named(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^reference model path \S+ does not exist$"):
        check_model_source(name, "reference model")


def test_a_hub_id_whose_organisation_is_a_folder_here_is_still_a_hub_id(tmp_path, monkeypatch):
    """`Qwen/Qwen2.5-0.5B` downloaded to ./Qwen/ does not make `Qwen/Qwen2.5-1.5B` a path:
    transformers would fetch it. If the hub cannot be reached, both readings are named."""
    _hub_cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen" / "Qwen2.5-0.5B").mkdir(parents=True)
    monkeypatch.setattr(loading, "_unreachable", lambda url: None)
    check_model_source("Qwen/Qwen2.5-1.5B")
    monkeypatch.setattr(loading, "_unreachable", lambda url: "refused")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match=r"not a local directory \(Qwen/ here has no Qwen2.5"):
        check_model_source("Qwen/Qwen2.5-1.5B")


@pytest.mark.parametrize("loader", ["tokenizer", "model"])
def test_loaders_name_a_missing_path(loader, tmp_path, monkeypatch):
    """Callers that skip the command line's checks (train(), merge) get the same message."""
    from align.loop.setup import load_tokenizer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="^model path ./gone does not exist"):
        if loader == "tokenizer":
            load_tokenizer(SimpleNamespace(model="./gone", trust_remote_code=False))
        else:
            loading.load_causal_lm("./gone", False)


def _hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_an_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    _hub_cache(tmp_path, monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    probed = []
    monkeypatch.setattr(loading, "_unreachable", lambda url: probed.append(url) or "refused")
    with pytest.raises(ConfigError) as err:
        check_model_source("org/name", given_by="--model")
    assert str(err.value).startswith(
        "model 'org/name' (given by --model) is not a local directory and the model hub is "
        "unreachable (refused)"
    )
    assert probed
    monkeypatch.setattr(loading, "_unreachable", lambda url: None)
    check_model_source("org/name")  # reachable: from_pretrained reports what the hub says


def test_offline_needs_no_probe_and_accepts_a_cached_model(tmp_path, monkeypatch):
    cache = _hub_cache(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_probe(url):
        raise AssertionError("probed the hub while offline")

    monkeypatch.setattr(loading, "_unreachable", no_probe)
    with pytest.raises(ConfigError, match=r"offline mode is on \(HF_HUB_OFFLINE\) and the model"):
        check_model_source("org/name")
    _cache_model(cache, "org/name")
    check_model_source("org/name")


def _cache_model(cache, repo_id):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_a_cached_model_with_the_hub_unreachable_loads_offline(tmp_path, monkeypatch, capsys):
    """The usual cluster node: the model downloaded beforehand, no internet. Without offline
    mode the hub client spends minutes retrying before it reads the cache."""
    from huggingface_hub import constants

    _cache_model(_hub_cache(tmp_path, monkeypatch), "org/cached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "_unreachable", lambda url: "refused")
    check_model_source("org/cached")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert "loads from the cache (HF_HUB_OFFLINE=1)" in capsys.readouterr().err
