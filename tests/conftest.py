"""Shared fixtures: plugin isolation, a tiny model directory and small data files."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from align import demo, plugins
from align.testing import reset_accelerate

# One thread per test process unless OMP_NUM_THREADS says otherwise: `pytest -n 2` runs two
# workers, and PyTorch's default of a thread per core in each oversubscribes the cores (on a
# loaded 2-core machine the suite took 44 minutes instead of about 4). Processes the tests
# start inherit the variable.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A shell without job control starts a background job (`pytest -n 2 &`, nohup) with SIGINT
# ignored, and every process inherits that: the Ctrl-C tests would see their runs go on. The
# tests send Ctrl-C on purpose, so they take it back (the processes they start then get the
# default disposition).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def isolated_plugins(monkeypatch, tmp_path_factory):
    """Load only first-party plugins under test, and keep the demo cache out of ~/.cache."""
    monkeypatch.setenv(
        plugins.PLUGINS_ENV,
        "align-plugin-sft,align-plugin-dpo,align-plugin-kto,align-plugin-minorsft,align-plugin-ift,align-plugin-lora,align-plugin-orpo,align-plugin-grpo,align-plugin-online-dpo,align-plugin-reward-model,align-plugin-rloo,align-plugin-distillation",
    )
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))
    plugins.reset_registry()
    yield
    plugins.reset_registry()
    reset_accelerate()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The demo's tiny Llama and tokenizer, saved like a user's model directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    demo.build_demo_model(path)
    return path


@pytest.fixture(scope="session")
def untied_model_dir(model_dir, tmp_path_factory):
    """The demo architecture with separate input and output embeddings."""
    path = tmp_path_factory.mktemp("untied-model")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tied = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LlamaConfig(**{**tied.config.to_dict(), "tie_word_embeddings": False})
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def poisoned_model_dir(untied_model_dir, tmp_path_factory):
    """The untied model with a NaN input embedding for "~": a sequence holding it has a NaN
    loss, and the others are untouched."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("poisoned")
    tokenizer = AutoTokenizer.from_pretrained(untied_model_dir)
    model = AutoModelForCausalLM.from_pretrained(untied_model_dir)
    (tilde,) = tokenizer("~", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[tilde] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _pip(*args: str) -> None:
    import subprocess
    import sys

    command = [sys.executable, "-m", "pip", *args]
    subprocess.run(command, check=True, capture_output=True, timeout=300)


def pip_install_into(target: Path, *projects: Path | str) -> None:
    """``pip install`` local projects into a ``--target`` directory (no dependencies, offline)."""
    _pip(
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(target),
        *map(str, projects),
    )


def pip_wheel_into(target: Path, *projects: Path | str) -> None:
    """Build wheels of local projects into ``target`` (no dependencies, offline)."""
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(target), *map(str, projects))


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def write_jsonl():
    """``write_jsonl(path, rows) -> path``."""
    return _write_jsonl


@pytest.fixture
def sft_rows() -> list[dict]:
    """Prompt/completion rows of different lengths."""
    return [
        {"prompt": f"What is {a} + {b}? ", "completion": f"{a} + {b} = {a + b}." + " ok" * (a % 3)}
        for a, b in [(1, 2), (10, 20), (3, 4), (7, 30), (12, 1), (5, 5), (40, 2), (8, 9)]
    ]


@pytest.fixture
def sft_pairs(tmp_path, write_jsonl, sft_rows):
    """A preference file (``pairs.jsonl``) of sft_rows: each completion chosen over a wrong
    answer."""
    rows = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": f"It is {i}."}
        for i, r in enumerate(sft_rows)
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def _crash_copy(done: Path, target: Path, checkpoint_step: int, logged_up_to: int) -> None:
    """What a run killed after step ``logged_up_to`` leaves: ``done``'s directory without its
    final model and checkpoints after ``checkpoint_step``, its metrics cut there, status
    running."""
    import shutil

    from align.loop.resume import complete_checkpoints

    shutil.copytree(done, target)
    shutil.rmtree(target / "final")
    for step, path in complete_checkpoints(target):
        if step > checkpoint_step:
            shutil.rmtree(path)
    rows = [r for r in (target / "metrics.jsonl").read_text().splitlines() if r.strip()]
    kept = [r for r in rows if json.loads(r)["step"] <= logged_up_to]
    (target / "metrics.jsonl").write_text("".join(r + "\n" for r in kept))
    info = json.loads((target / "run.json").read_text())
    (target / "run.json").write_text(json.dumps({**info, "status": "running"}))


@pytest.fixture
def crash_copy():
    """``crash_copy(done, target, checkpoint_step, logged_up_to)``: a killed run's directory."""
    return _crash_copy
