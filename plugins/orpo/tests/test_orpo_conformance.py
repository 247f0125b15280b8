"""The align.testing conformance suite for the orpo objective."""

from align.testing import ObjectiveConformance


class TestORPOConformance(ObjectiveConformance):
    objective = "orpo"


class TestORPOPromptNLLConformance(ObjectiveConformance):
    objective = "orpo"
    options = {"nll_on_prompt": True}
