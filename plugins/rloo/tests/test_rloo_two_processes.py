"""``align run --objective rloo`` on two data-parallel processes equals one process with the
same prompts in one micro-batch: each process samples and scores its own prompts, the
advantages are normalised over the round on both processes, the KL is each process's own, and
the loss is divided by the step's completions on both (TRL's DDP average of equal per-process
means is the same value)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rloo_worker import DistinctSums

from align.cli import cli
from align.demo import build_demo_model, demo_data
from align.testing import registered, reset_accelerate


@pytest.mark.scale_out  # starts two processes (about 20 s on 2 CPU cores)
def test_two_processes_train_as_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    build_demo_model(model)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(demo_data("prompt_only", "train").read_text().splitlines(True)[:8]))
    common = ["--objective", "rloo", "--model", str(model), "--data", str(data)]
    common += ["--generator", "distinct-sums", "--reward", "addition", "--lr", "3e-3"]
    common += ["--max-completion-length", "16", "--max-steps", "4", "--no-eval-on-start"]
    for option in ("num_generations=4", "beta=0.1", "normalize_advantages=true"):
        common += ["--set", option]
    common += ["--set", "num_iterations=2", "--set", "epsilon=0.05"]  # the clip acts at step 4

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    worker = Path(__file__).with_name("rloo_worker.py")
    two = [*common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")]
    result = subprocess.run(
        [*torchrun, "--nproc_per_node", "2", str(worker), *two],
        env=env, timeout=300, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reset_accelerate()
    try:
        with registered(DistinctSums()):
            one = [*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]
            outcome = CliRunner().invoke(cli, ["run", *one])
    finally:
        reset_accelerate()
    assert outcome.exit_code == 0, outcome.output + repr(outcome.exception)

    def rows(name):
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    one_rows, two_rows = rows("one"), rows("two")
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows] == [1, 2, 3, 4]
    for a, b in zip(one_rows, two_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"num_tokens_computed"}:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert one_rows[2]["kl"] != 0 and one_rows[3]["clip_ratio/region_mean"] > 0
