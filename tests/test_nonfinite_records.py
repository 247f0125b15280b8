"""A non-finite loss names the records whose own loss is not finite: each example of a bad
micro-batch is tried alone, and only when none is bad alone is the micro-batch named (and the
message says why)."""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import align
from align import plugins
from align.cli import cli
from align.loop import stopping


class PoisonFields(align.Fields):
    poison: bool = False  # this record's own loss is infinite
    pair: bool = False  # two such records in one micro-batch make its loss infinite


class Poisoned:
    """An SFT loss that a record's fields make infinite."""

    __name__ = "poisoned"

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="poisoned", description="test", fields=PoisonFields))

    @align.hookimpl
    def align_compute_loss(self, model, batch):
        nll = -align.forward_logps(model, batch).sums
        poison = batch["poison"].to(nll.device)
        per = torch.where(poison, torch.full_like(nll, math.inf), nll)
        if int(batch["pair"].sum()) >= 2:
            per = per + math.inf
        return align.LossOutput(loss=per.sum(), count=len(per))


def _run(tmp_path, model_dir, write_jsonl, sft_rows, marks, *extra, expect=1):
    rows = [{**row, **marks.get(i, {})} for i, row in enumerate(sft_rows[:4], start=1)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    plugins.reset_registry(plugins.load_plugins(extra=[Poisoned()]))
    args = ["--objective", "poisoned", "--model", str(model_dir), "--data", str(data)]
    args += ["--batch-size", "4", "--max-steps", "1", "--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, ["run", *args, *extra])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return data, result.output


def test_an_infinite_loss_names_only_the_record_whose_own_loss_is_infinite(
    tmp_path, model_dir, write_jsonl, sft_rows
):
    data, output = _run(tmp_path, model_dir, write_jsonl, sft_rows, {3: {"poison": True}})
    assert "step 1: the loss is inf (not finite)" in output
    assert f"Records whose own loss is not finite: {data}: line 3." in output
    for other in ("line 1", "line 2", "line 4"):
        assert other not in output


def test_records_bad_only_together_are_named_as_their_micro_batch(
    tmp_path, model_dir, write_jsonl, sft_rows
):
    marks = {1: {"pair": True}, 4: {"pair": True}}
    data, output = _run(
        tmp_path, model_dir, write_jsonl, sft_rows, marks, "--on-nonfinite", "skip", expect=0
    )
    assert "step 1: the loss is inf; step skipped (1 so far)" in output
    assert "none of them non-finite alone (together they make it so)" in output
    assert "Records whose own loss" not in output
    for line in ("line 1", "line 2", "line 3", "line 4"):
        assert line in output


# -- offending_examples on its own -----------------------------------------------------------
ONE = SimpleNamespace(num_processes=1, device=torch.device("cpu"))


def _examples(n):
    return [{"record": f"line {i + 1}", "bad": i in (2, 5)} for i in range(n)]


def test_each_bad_micro_batch_is_tried_example_by_example():
    examples = _examples(8)
    group = [([0, 1, 2, 3], None), ([4, 5, 6, 7], None)]
    losses = [torch.tensor(math.inf), torch.tensor(1.0)]
    tried = []

    def finite_alone(batch):
        tried.append(batch[0]["record"])
        assert not torch.is_grad_enabled()
        return not batch[0]["bad"]

    found = stopping.offending_examples(group, losses, "loss", examples, ONE, finite_alone)
    assert found.own == ["line 3"] and not found.together and not found.batch
    assert tried == ["line 1", "line 2", "line 3", "line 4"]  # the finite micro-batch is not
    assert found.describe("d.jsonl") == "Records whose own loss is not finite: d.jsonl: line 3"
    gradient = stopping.offending_examples(group, losses, "gradient", examples, ONE, finite_alone)
    assert gradient.batch == [f"line {i}" for i in range(1, 9)] and len(tried) == 4
    assert gradient.describe("d.jsonl").startswith("Examples in this step's batch: d.jsonl: line 1")


def test_without_a_culprit_alone_or_a_way_to_try_the_micro_batch_is_named():
    examples = _examples(4)
    group = [([0, 1], None), ([2, 3], None)]
    losses = [torch.tensor(math.nan), torch.tensor(1.0)]
    found = stopping.offending_examples(group, losses, "loss", examples, ONE, lambda b: True)
    assert found.together == ["line 1", "line 2"] and not found.own
    unsplit = stopping.offending_examples(group, losses, "loss", examples, ONE, None, "on-policy")
    assert unsplit.batch == ["line 1", "line 2"] and unsplit.why == "on-policy"
    assert "(on-policy): d: line 1, line 2" in unsplit.describe("d")

    def refuses(batch):
        raise ValueError("needs two")

    failed = stopping.offending_examples(group, losses, "loss", examples, ONE, refuses)
    assert failed.batch == ["line 1", "line 2"]
    assert failed.why == "a batch of one failed: ValueError: needs two"


def test_every_process_makes_as_many_forwards(monkeypatch):
    """A forward under FSDP or ZeRO-3 is collective: a process with fewer examples to try
    makes forwards of its own until it has made as many as the process with the most."""
    examples = _examples(4)
    group = [([0, 1], None), ([2, 3], None)]
    losses = [torch.tensor(1.0), torch.tensor(1.0)]  # nothing bad here: another process's
    monkeypatch.setattr(stopping, "_most", lambda count, accelerator: 3)
    monkeypatch.setattr("accelerate.utils.gather_object", lambda found: found)
    calls = []
    many = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    found = stopping.offending_examples(
        group, losses, "loss", examples, many, lambda b: calls.append(b) or True
    )
    assert len(calls) == 3 and not found.records()


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_the_message_names_the_records(what):
    found = stopping.Offenders(what, own=["line 3"]) if what == "loss" else None
    found = found or stopping.Offenders(what, batch=["line 1", "line 2"])
    message = stopping.nonfinite_message(4, what, math.nan, found, "d.jsonl", None)
    assert message.startswith(f"step 4: the {what} is nan (not finite). ")
    named = "Records whose own loss is not finite: d.jsonl: line 3."
    assert (named if what == "loss" else "batch: d.jsonl: line 1, line 2.") in message


# -- over processes ------------------------------------------------------------------------------
@pytest.mark.scale_out
@pytest.mark.xdist_group("torchrun")
def test_two_processes_name_the_record_and_try_as_many_each(
    tmp_path, poisoned_model_dir, write_jsonl, sft_rows
):
    """One process's micro-batch holds the NaN record, the other's none: the other makes as
    many forwards as the first tries examples (a DDP forward may be collective), and the main
    process names the one record."""
    rows = list(sft_rows[:4])
    rows[2] = {"prompt": "What is ~? ", "completion": "A tilde."}  # line 3
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = ["run", "--model", poisoned_model_dir, "--data", data, "--batch-size", "2"]
    args += ["--max-steps", "1", "--output-dir", tmp_path / "out", "--num-processes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "align.cli", *map(str, args)]
    result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "step 1: the loss is nan (not finite)" in result.stderr
    assert f"Records whose own loss is not finite: {data}: line 3." in result.stderr
