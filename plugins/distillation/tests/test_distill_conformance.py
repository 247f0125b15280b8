"""The align.testing conformance suite for ``distill``: fully on-policy (DistillationTrainer's
default), GKD's mix, and on the data's completions alone, each against a teacher of another
width (the suite builds it)."""

from align.testing import ObjectiveConformance


class TestDistillConformance(ObjectiveConformance):
    objective = "distill"


class TestDistillJSDMixedConformance(ObjectiveConformance):
    objective = "distill"
    options = {"beta": 0.5, "lmbda": 0.5}


class TestDistillForwardKLOnDataConformance(ObjectiveConformance):
    objective = "distill"
    options = {"beta": 0.0, "lmbda": 0.0}
