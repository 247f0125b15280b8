"""The align.testing conformance suite for the ift objective."""

from align.testing import ObjectiveConformance


class TestIFTConformance(ObjectiveConformance):
    objective = "ift"


class TestIFTExpectedConformance(ObjectiveConformance):
    objective = "ift"
    options = {"prediction": "expected", "gamma": 1.0}
