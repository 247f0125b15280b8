"""The align.testing conformance suite for the grpo objective, on rollout batches the suite
samples from its tiny model (``bnpo`` is left out: TRL defines it as a mean of per-micro-batch
token means, so splitting a step into micro-batches changes it by design)."""

from align.testing import ObjectiveConformance


class TestGRPOConformance(ObjectiveConformance):
    objective = "grpo"
    options = {"num_generations": 2}


class TestGRPOReusedRolloutsWithKLConformance(ObjectiveConformance):
    objective = "grpo"
    options = {
        "num_generations": 3,
        "num_iterations": 2,
        "beta": 0.1,
        "loss_type": "grpo",
        "scale_rewards": "batch",
        "epsilon_high": 0.28,
    }


class TestDrGRPOConformance(ObjectiveConformance):
    objective = "grpo"
    options = {"num_generations": 2, "loss_type": "dr_grpo", "scale_rewards": "none"}
