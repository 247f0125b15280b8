"""A loss of several terms, each normalised by its own unit over the whole step: gradient
accumulation equals one large batch for every term (ORPO: an NLL over chosen tokens and an
odds-ratio term over pairs), padded and packed layouts agree, and a plugin whose counts do not
match is stopped with a message that says what to fix."""

import json

import pytest
import torch
from click.testing import CliRunner
from test_distributed import _orpo_rows

import align
from align.cli import cli
from align.loop.metrics import MetricSums
from align.loop.step import accumulate_gradients
from align.plugins.testing import _OneProcess
from align.testing import registered


def _run(tmp_path, model_dir, data, name, *extra):
    out = tmp_path / name
    args = ["run", "--objective", "orpo", "--model", str(model_dir), "--data", str(data)]
    args += ["--max-steps", "2", "--lr", "1e-2", "--output-dir", str(out), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _same(a_rows, b_rows, skip=("learning_rate", "step", "epoch", "num_tokens_computed")):
    assert len(a_rows) == len(b_rows)
    for a, b in zip(a_rows, b_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {*skip, "grad_norm"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_orpo_grad_accum_equals_one_large_batch(tmp_path, model_dir, write_jsonl):
    """Batch 16 and batch 8 × grad-accum 2: the same losses, metrics and gradient norms (the
    NLL's token counts differ between the two micro-batches, so a mean of means would not)."""
    data = write_jsonl(tmp_path / "d.jsonl", _orpo_rows())
    one = _run(tmp_path, model_dir, data, "one", "--batch-size", "16")
    accum = _run(tmp_path, model_dir, data, "accum", "--batch-size", "8", "--grad-accum", "2")
    _same(one, accum)
    assert one[0]["loss"] == pytest.approx(one[0]["loss/nll"] + one[0]["loss/odds_ratio"])


def test_orpo_padded_and_packed_runs_agree(tmp_path, model_dir, write_jsonl):
    data = write_jsonl(tmp_path / "d.jsonl", _orpo_rows(8))
    packed = _run(tmp_path, model_dir, data, "packed", "--batch-size", "4")
    padded = _run(tmp_path, model_dir, data, "padded", "--batch-size", "4", "--no-padding-free")
    _same(packed, padded, skip=("learning_rate", "step", "epoch", "num_tokens_computed"))
    info = json.loads((tmp_path / "packed" / "run.json").read_text())
    assert info["packed_batches"] is True
    assert json.loads((tmp_path / "padded" / "run.json").read_text())["packed_batches"] is False


class Miscounted:
    """A token-mean loss that leaves align_loss_counts to the default (examples)."""

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="miscounted", description="counts tokens, declares none"))

    @align.hookimpl
    def align_compute_loss(self, model, batch):
        out = align.forward_logps(model, batch)
        return align.LossOutput(loss=-out.sums.sum(), count=out.num_tokens.sum())


def test_counts_that_disagree_with_the_loss_stop_the_run(
    tmp_path, model_dir, write_jsonl, sft_rows
):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    args = ["run", "--objective", "miscounted", "--model", str(model_dir), "--data", str(data)]
    args += ["--max-steps", "1", "--output-dir", str(tmp_path / "out")]
    with registered(Miscounted(), only=True):
        result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    message = str(result.exception) + result.output
    assert "align_loss_counts gave 8" in message and "term 'loss'" in message


def test_each_term_is_scaled_by_its_own_total_before_backward():
    """Two terms with different units over two micro-batches: the accumulated gradient is that
    of Σ_t Σsum_t / Σcount_t, computed here independently."""

    w = torch.nn.Parameter(torch.tensor(2.0))
    data = [
        ({"x": torch.tensor([1.0, 2.0, 3.0])}, {"a": 3, "b": 1}),
        ({"x": torch.tensor([4.0])}, {"a": 1, "b": 1}),
    ]

    def compute(batch):
        x = batch["x"]
        terms = {"a": ((w * x).sum(), len(x)), "b": ((w * w * x.sum()), 1)}
        return align.LossOutput(terms=terms), {}

    loss = accumulate_gradients(w, data, compute, _OneProcess(), MetricSums())
    # a: Σ w·x / 4 = w·10/4; b: Σ w²·Σx / 2 = w²·10/2
    assert loss == pytest.approx(2.0 * 10 / 4 + 4.0 * 10 / 2)
    assert float(w.grad) == pytest.approx(10 / 4 + 2 * 2.0 * 10 / 2)


def test_a_term_without_units_must_add_nothing():
    w = torch.nn.Parameter(torch.tensor(2.0))

    def compute(batch):
        return align.LossOutput(terms={"a": (w * 3, 1), "b": (w * 1, 0)}), {}

    with pytest.raises(align.PluginError, match="term 'b' has a loss of 2 but a count of 0"):
        accumulate_gradients(w, [({}, {"a": 1, "b": 0})], compute, _OneProcess(), MetricSums())


def test_orpo_with_the_prompt_in_the_nll_is_recorded_as_padded(tmp_path, model_dir, write_jsonl):
    """nll_on_prompt builds padded batches whatever the run asks: run.json and the log say so."""
    data = write_jsonl(tmp_path / "d.jsonl", _orpo_rows(4))
    out = tmp_path / "run"
    args = ["run", "--objective", "orpo", "--model", str(model_dir), "--data", str(data)]
    args += ["--max-steps", "1", "--set", "nll_on_prompt=true", "--output-dir", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "padding_free: off, the objective's align_build_batch gives padded" in result.output
    assert json.loads((out / "run.json").read_text())["packed_batches"] is False
