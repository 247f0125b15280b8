"""The align.testing conformance suite for the sft objective."""

from align.testing import ObjectiveConformance


class TestSFTConformance(ObjectiveConformance):
    objective = "sft"
