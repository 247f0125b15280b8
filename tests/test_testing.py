"""The conformance suite itself: it passes a good plugin and fails a broken one."""

pytest_plugins = ["pytester"]

BROKEN_PLUGIN = """
import torch  # at import time: the suite says so
import align


@align.hookimpl
def align_register_objectives(register):
    register(align.Objective(name="broken", description="padding-dependent loss"))


@align.hookimpl
def align_compute_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return align.LossOutput(
        loss=logits.mean(),  # every position, padding included; a mean, not a sum
        count=batch["input_ids"].shape[0],
        metrics={"vector": (logits.mean(-1).sum(-1).detach(), 1)},  # not a scalar
    )
"""

SUITE = """
import broken_plugin
from align.testing import ObjectiveConformance


class TestBroken(ObjectiveConformance):
    objective = "broken"
    plugin = broken_plugin
"""


def test_the_suite_fails_a_broken_plugin(pytester, monkeypatch):
    pytester.makepyfile(broken_plugin=BROKEN_PLUGIN, test_broken=SUITE)
    monkeypatch.setenv("ALIGN_PLUGINS", "")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    # skipped: no fields, not packable, not on-policy (the KL check)
    result.assert_outcomes(passed=5, failed=4, skipped=3)
    output = result.stdout.str()
    for check in (
        "test_extra_padding_leaves_the_loss_unchanged",
        "test_metrics_are_scalar_sum_count_pairs",
        "test_importing_the_plugin_does_not_import_torch",
        "test_micro_batches_equal_one_batch",
    ):
        assert f"FAILED test_broken.py::TestBroken::{check}" in output


MEAN_PLUGIN = """
import align


@align.hookimpl
def align_register_objectives(register):
    register(align.Objective(name="mean", description="a token mean where a sum is due"))


@align.hookimpl
def align_loss_counts(batch):
    return {"loss": align.sequence_token_counts(batch).sum()}


@align.hookimpl
def align_compute_loss(model, batch):
    out = align.forward_logps(model, batch)
    return align.LossOutput(loss=-out.sums.sum() / out.num_tokens.sum(), count=out.num_tokens.sum())
"""


def test_the_suite_fails_a_loss_that_returns_a_mean(pytester, monkeypatch):
    """Right in one batch, so every single-batch check passes; split into micro-batches, the
    core divides the mean again and the step's loss and gradient change."""
    suite = SUITE.replace("broken", "mean").replace("TestBroken", "TestMean")
    pytester.makepyfile(mean_plugin=MEAN_PLUGIN, test_mean=suite)
    monkeypatch.setenv("ALIGN_PLUGINS", "")
    result = pytester.runpytest_subprocess(
        "-q", "-p", "no:cacheprovider", "-k", "not resumed and not two_step and not importing"
    )
    result.assert_outcomes(passed=5, failed=1, skipped=3)
    output = result.stdout.str()
    assert "FAILED test_mean.py::TestMean::test_micro_batches_equal_one_batch" in output
    assert "return a mean" in output


STATEFUL_PLUGIN = """
import align

CALLS = [0]  # a counter kept between calls: a resumed run starts it again at 0


@align.hookimpl
def align_register_objectives(register):
    register(align.Objective(name="stateful", description="a loss with its own step counter"))


@align.hookimpl
def align_loss_counts(batch):
    return {"loss": align.sequence_token_counts(batch).sum()}


@align.hookimpl
def align_compute_loss(model, batch, run):
    logps = align.forward_logps(model, batch)
    if run.training:
        CALLS[0] += 1
    weight = 1.0 + 0.5 * CALLS[0]
    loss = -weight * logps.logps.mul(logps.mask).sum()
    return align.LossOutput(loss=loss, count=logps.num_tokens)
"""


def test_the_suite_fails_a_plugin_that_does_not_resume(pytester, monkeypatch):
    """A loss that counts its own steps instead of reading run.step: a resumed run differs."""
    suite = SUITE.replace("broken", "stateful").replace("TestBroken", "TestStateful")
    pytester.makepyfile(stateful_plugin=STATEFUL_PLUGIN, test_stateful=suite)
    monkeypatch.setenv("ALIGN_PLUGINS", "")
    result = pytester.runpytest_subprocess(
        "-q", "-p", "no:cacheprovider", "-k", "resumed or two_step"
    )
    result.assert_outcomes(passed=1, failed=1)
    assert "FAILED test_stateful.py::TestStateful::test_a_resumed_run_equals" in result.stdout.str()
