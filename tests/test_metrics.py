"""Metrics and losses are reduced as Σsum/Σcount over micro-batches and processes."""

import pytest
import torch

from align.loop.metrics import MetricSums


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
