"""The align.testing conformance suite for the reward-model objective: a sequence classifier
built by the suite from its tiny model, padded and packed batches, a run, its resume."""

from align.testing import ObjectiveConformance


class TestRewardModelConformance(ObjectiveConformance):
    objective = "reward-model"


class TestCenteredRewardModelConformance(ObjectiveConformance):
    objective = "reward-model"
    options = {"center_rewards_coefficient": 0.01}
