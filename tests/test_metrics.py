"""Metrics and losses are reduced as Σsum/Σcount over micro-batches and processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.metrics import MetricSums


def test_uneven_counts_are_weighted_by_count():
    sums = MetricSums()
    sums.add_all({"acc": (3.0, 1)})  # micro-batch 1: one token, 3 "correct"
    sums.add_all({"acc": (torch.tensor(1.0), torch.tensor(3))})
    sums.add_all({"rare": (0.0, 0)})  # no examples of a class: left out, not NaN
    assert sums.reduce() == {"acc": 1.0}  # (3 + 1) / (1 + 3); a mean of means would be 2.0
    sums.clear()
    assert sums.reduce() == {}


def test_metric_must_be_a_pair():
    with pytest.raises(TypeError, match="must be a \\(sum, count\\) pair"):
        MetricSums().add_all({"x": 1.0})


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_processes_equal_one_large_batch(tmp_path, model_dir, write_jsonl, sft_rows):
    """Two gloo processes with 4 examples each: the same loss and gradients as one batch of 8."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            str(torchrun) if torchrun.exists() else "torchrun",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(__file__).with_name("distributed_worker.py")),
            str(model_dir),
            str(tmp_path),
            str(data),
        ],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    reduced = json.loads((tmp_path / "metrics.json").read_text())
    assert reduced["uneven"] == pytest.approx(1.0)  # (3 + 1) / (1 + 3)
    assert reduced["only_rank1"] == pytest.approx(1.0)  # names are gathered from every process

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align import default_batch
    from align.formats import tokenize_records
    from align.records import read_records
    from align.train import accumulate_gradients
    from align_sft.loss import sft_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_records(
        read_records(data), "prompt_completion", tokenizer, 64, "error", "train"
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = default_batch("prompt_completion", examples, tokenizer.pad_token_id)
    loss = accumulate_gradients(
        model,
        [batch],
        lambda b: (sft_loss(model, b, "token"), {}),
        Accelerator(cpu=True),
        MetricSums(),
    )
    assert reduced["step_loss"] == pytest.approx(loss, abs=1e-5)
    assert reduced["logged_loss"] == pytest.approx(loss, abs=1e-5)
    two = load_file(str(tmp_path / "grads.safetensors"))
    one = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert two.keys() == one.keys()
    for name, grad in one.items():
        assert torch.allclose(two[name], grad, atol=1e-5, rtol=0), name
