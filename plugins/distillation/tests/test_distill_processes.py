"""``distill`` on two data-parallel processes (CPU, gloo) equals one process with the combined
batch: the teacher runs on each process, and the token mean of the divergence is over the
whole step's tokens on every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from align.cli import cli

pytestmark = pytest.mark.xdist_group("torchrun")  # torchrun's ports: one launch at a time


def test_two_processes_equal_one_large_batch(student_dir, teacher_dir, tmp_path, monkeypatch):
    rows = [
        {"prompt": f"What is {a} + {b}?", "completion": f"{a + b}."}
        for a in range(4)
        for b in (3, 11)
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["run", "--objective", "distill", "--model", str(student_dir), "--data", str(data)]
    common += ["--teacher", str(teacher_dir), "--set", "lmbda=0", "--set", "beta=0.5"]
    common += ["--max-steps", "2", "--lr", "1e-2", "--report-to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE": str(tmp_path / "cache-two")}
    two = [*common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")]
    cmd = [sys.executable, "-m", "align.cli", *two, "--num-processes", "2"]
    result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache-one"))
    one = [*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]
    outcome = CliRunner().invoke(cli, one)
    assert outcome.exit_code == 0, outcome.output

    def metrics(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    for a, b in zip(metrics("one"), metrics("two"), strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"num_tokens", "num_tokens_computed"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), key
    first = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    second = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name, value in first.items():
        assert torch.allclose(value, second[name], atol=1e-4, rtol=0), name
