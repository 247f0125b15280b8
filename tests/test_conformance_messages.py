"""The objective conformance suite's messages name what differs, with numbers: the totals of a
mean, counts that follow a packed batch's rows, an example's loss that depends on the rest of
its micro-batch (one baseline for the whole micro-batch), a loss that reads padding."""

import os
import re
import subprocess
import sys

import pytest
from test_testing import MEAN_PLUGIN  # a token mean where a sum is due

SUITE = """
import {module}
from align.testing import ObjectiveConformance


class Test{camel}(ObjectiveConformance):
    objective = "{name}"
    plugin = {module}
    records = {records}
"""

BASELINE_PLUGIN = """
import align


@align.hookimpl
def align_register_objectives(register):
    register(align.Objective(name="baseline", description="one baseline per micro-batch"))


@align.hookimpl
def align_compute_loss(model, batch):
    out = align.forward_logps(model, batch)
    score = out.num_tokens.float()  # a per-example reward: its completion's length
    advantage = score - score.mean()  # a baseline over the whole micro-batch, not per group
    return align.LossOutput(loss=-(advantage * out.sums).sum(), count=len(score))
"""

ROWS_PLUGIN = """
import align


@align.hookimpl
def align_register_objectives(register):
    register(align.Objective(name="rows", description="packed rows as examples", packable=True))


@align.hookimpl
def align_loss_counts(batch):
    return {"loss": batch["input_ids"].shape[0]}  # rows: in a packed batch, not the examples


@align.hookimpl
def align_compute_loss(model, batch):
    out = align.forward_logps(model, batch)
    per_row = -(out.logps * out.mask).sum(-1) / out.mask.sum(-1)  # a packed row: several
    return align.LossOutput(loss=per_row.sum(), count=batch["input_ids"].shape[0])
"""

PADDING_PLUGIN = """
import align


@align.hookimpl
def align_register_objectives(register):
    register(align.Objective(name="padding", description="counts padding tokens"))


@align.hookimpl
def align_loss_counts(batch):
    return {"loss": batch["input_ids"].numel()}


@align.hookimpl
def align_compute_loss(model, batch):
    out = align.forward_logps(model, batch)
    return align.LossOutput(loss=-out.sums.sum(), count=batch["input_ids"].numel())
"""


# An on-policy objective with a KL to the reference; {policy} and {reference} give the
# temperatures it scores them at (run.config.temperature is the one it sampled at).
TEMPERATURE_PLUGIN = """
import align


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="{name}", description="a KL to the reference", shapes=("prompt_only",),
            needs_reference=True, sampling=lambda options: align.Sampling(2),
        )
    )


@align.hookimpl
def align_compute_loss(model, batch, reference, run):
    policy = align.forward_logps(model, batch{policy})
    kl = policy.sums.detach() - reference.sequence_logps(batch{reference})
    loss = -(policy.logps * policy.mask).sum(-1)
    return align.LossOutput(loss=loss.sum(), count=len(loss), metrics={{"kl": (kl.sum(), len(kl))}})
"""
AT_RUN_TEMPERATURE = ", temperature=run.config.temperature"
# the reference at temperature 1 (the default), the policy at the sampling temperature
COLD_REFERENCE_PLUGIN = TEMPERATURE_PLUGIN.format(
    name="cold", policy=AT_RUN_TEMPERATURE, reference=""
)
# the other way round
COLD_POLICY_PLUGIN = TEMPERATURE_PLUGIN.format(
    name="coldpolicy", policy="", reference=AT_RUN_TEMPERATURE
)
# both at temperature 1, as TRL's online DPO: alike, so the KL is 0 at step 0 (passes)
ALIKE_PLUGIN = TEMPERATURE_PLUGIN.format(name="alike", policy="", reference="")

# One long record and short ones: packed, the short ones share a row.
RECORDS = [
    {"prompt": "What is 7 + 12? Say each step of the working, then the sum.", "completion": "19"},
    {"prompt": "1 + 1?", "completion": "2"},
    {"prompt": "2 + 2?", "completion": "4"},
    {"prompt": "3 + 3?", "completion": "6"},
]

# name -> (plugin, records, the checks to run)
CASES = {
    "baseline": (BASELINE_PLUGIN, None, "micro_batches"),
    "rows": (ROWS_PLUGIN, RECORDS, "packed_batches or micro_batches"),
    "mean": (MEAN_PLUGIN, None, "micro_batches"),
    "padding": (PADDING_PLUGIN, None, "extra_padding"),
    "cold": (COLD_REFERENCE_PLUGIN, None, "kl_to"),
    "coldpolicy": (COLD_POLICY_PLUGIN, None, "kl_to"),
    "alike": (ALIKE_PLUGIN, None, "kl_to"),
}


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """The suite run once on every broken plugin: each failed check's report, by
    ``TestName.check``."""
    folder = tmp_path_factory.mktemp("broken-objectives")
    selected = []
    for name, (plugin, records, checks) in CASES.items():
        module = f"{name}_plugin"
        (folder / f"{module}.py").write_text(plugin)
        suite = SUITE.format(module=module, camel=name.capitalize(), name=name, records=records)
        (folder / f"test_{name}.py").write_text(suite)
        selected.append(f"(test_{name} and ({checks}))")
    env = {
        **os.environ,
        "ALIGN_PLUGINS": "",
        "PYTHONPATH": os.pathsep.join([str(folder), *sys.path]),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            " or ".join(selected),
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Each failure's report runs to the next one's header; the last one's, to the summary (which
    # lists every failure's first line, other checks' causes included).
    failures = re.split(r"^=+ short test summary info =+$", result.stdout, flags=re.M)[0]
    sections = re.split(r"^_{3,} (\S+) _{3,}$", failures, flags=re.M)
    return Reports(zip(sections[1::2], sections[2::2], strict=True), output=result.stdout)


class Reports(dict):
    """Failed checks' reports; a check that did not fail is an assertion showing the run."""

    def __init__(self, items, output):
        super().__init__(items)
        self.output = output

    def __missing__(self, check):
        raise AssertionError(f"{check} did not fail:\n{self.output[-3000:]}")


def test_one_baseline_for_the_micro_batch_is_named_with_each_examples_values(failures):
    report = failures["TestBaseline.test_micro_batches_equal_one_batch"]
    assert "return a mean" not in report
    assert "depend on the other examples of their micro-batch" in report
    assert "a baseline, a normalisation or a mean taken over the whole micro-batch" in report
    assert "line 1: 0 alone" in report  # alone in a micro-batch, its own baseline: advantage 0
    assert "<- differs" in report


def test_packed_rows_counted_as_examples_are_named(failures):
    packed = failures["TestRows.test_packed_batches_give_the_padded_loss"]
    micro = failures["TestRows.test_micro_batches_equal_one_batch"]
    for report in (packed, micro):
        assert "return a mean" not in report
        assert "AssertionError: loss\n" not in report
    # the packed check: the counts and the layouts compared, and the sums against each example's
    assert "term 'loss' counts 4 units padded, 2 packed" in packed
    assert "the number of rows of each batch: a packed row holds several sequences" in packed
    assert "packed: input_ids packed, 4 sequences in 2 rows" in packed
    assert "as padded, not as packed" in packed
    # the micro-batch check: the counts do not add up over micro-batches
    assert "its counts do not add up: 2 units in the whole batch, 1 + 3 = 4" in micro
    assert "These are the batches' rows" in micro


def test_a_loss_that_returns_a_mean_is_shown_by_its_totals(failures):
    report = failures["TestMean.test_micro_batches_equal_one_batch"]
    assert "the values are the means of each call's units" in report
    assert "as means they agree" in report and "as sums they do not" in report
    assert "return a mean where the sum of its units is due" in report


def test_a_loss_that_counts_padding_is_named(failures):
    report = failures["TestPadding.test_extra_padding_leaves_the_loss_unchanged"]
    assert "5 more padding positions at the end of every row" in report
    assert "term 'loss' counts" in report and "with the padding" in report


def test_a_policy_and_reference_scored_at_different_temperatures_are_named(failures):
    """The KL at step 0 (the policy is the reference), sampling at 0.7, with the temperature
    each was scored at; both at 1 (TRL's online DPO) passes."""
    report = failures["TestCold.test_kl_to_the_reference_is_0_at_step_0"]
    assert "where the policy is the reference and the run samples at temperature 0.7" in report
    assert "metric 'kl' is " in report
    assert (
        "scored at different temperatures: 0.7 (align.forward_logps), "
        "1.0 (reference.sequence_logps)"
    ) in report
    report = failures["TestColdpolicy.test_kl_to_the_reference_is_0_at_step_0"]
    assert "metric 'kl' is " in report
    assert "0.7 (reference.sequence_logps), 1.0 (align.forward_logps)" in report
    assert "TestAlike.test_kl_to_the_reference_is_0_at_step_0" not in failures
