"""The align.testing conformance suite for the kto objective."""

from align.testing import ObjectiveConformance


class TestKTOConformance(ObjectiveConformance):
    objective = "kto"
