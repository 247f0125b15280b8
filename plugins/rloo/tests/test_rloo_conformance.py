"""The align.testing conformance suite for the rloo objective, on rollout batches the suite
samples from its tiny model: the default (β = 0.05, so a reference and the KL in the reward),
reused rounds with the clip, clipped rewards and normalised advantages, and no reference at all
(``mask_truncated_completions`` is left to the TRL parity tests: the suite's tiny model rarely
ends a completion, so every completion would leave the loss)."""

from align.testing import ObjectiveConformance


class TestRLOOConformance(ObjectiveConformance):
    objective = "rloo"
    options = {"num_generations": 2}


class TestRLOOReusedClippedNormalisedConformance(ObjectiveConformance):
    objective = "rloo"
    options = {
        "num_generations": 3,
        "num_iterations": 2,
        "beta": 0.1,
        "epsilon_high": 0.28,
        "normalize_advantages": True,
        "reward_clip_range": [0.2, 0.8],
    }


class TestRLOOWithoutReferenceConformance(ObjectiveConformance):
    objective = "rloo"
    options = {"num_generations": 4, "beta": 0.0}
