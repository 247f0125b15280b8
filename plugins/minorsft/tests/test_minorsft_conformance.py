"""The align.testing conformance suite for the minorsft objective."""

from align.testing import ObjectiveConformance


class TestMinorSFTConformance(ObjectiveConformance):
    objective = "minorsft"
