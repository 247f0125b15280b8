"""The align.testing conformance suite for the dpo objective."""

from align.testing import ObjectiveConformance


class TestDPOConformance(ObjectiveConformance):
    objective = "dpo"


class TestIPOConformance(ObjectiveConformance):
    objective = "dpo"
    options = {"loss_type": "ipo"}
