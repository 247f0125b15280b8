"""The align.testing conformance suite for ``distill``: fully on-policy on prompts
(DistillationTrainer's default), GKD's mix and the data's completions alone on prompt-completion
records, each against a teacher of another width (the suite builds it). The suite's loss checks
run on sampled batches; its two ``align run`` checks (a two-step run, a resumed run equal to an
uninterrupted one, the seeded draw of each step included) run the whole mix."""

from align.testing import ObjectiveConformance

# Records with completions, which the steps that do not sample (lmbda below 1) train on.
PAIRS = [
    {"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5."},
    {"prompt": "What is 17 + 25?", "completion": "17 + 25 = 42."},
    {"prompt": "What is 8 + 1?", "completion": "8 + 1 = 9."},
    {"prompt": "What is 30 + 12?", "completion": "30 + 12 = 42."},
]


class TestDistillConformance(ObjectiveConformance):
    objective = "distill"


class TestDistillJSDMixedConformance(ObjectiveConformance):
    objective = "distill"
    options = {"beta": 0.5, "lmbda": 0.5}
    records = PAIRS


class TestDistillForwardKLOnDataConformance(ObjectiveConformance):
    objective = "distill"
    options = {"beta": 0.0, "lmbda": 0.0}
    records = PAIRS


class TestDistillSeqKDConformance(ObjectiveConformance):
    """GKD's seq_kd on prompts: the steps not sampled by the student are the teacher's."""

    objective = "distill"
    options = {"lmbda": 0.5, "seq_kd": True}
