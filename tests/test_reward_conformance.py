"""RewardConformance: the first-party rewards pass it; a reward that returns the wrong number
of values, strings, values that are not finite, other values on every call, or values
normalised over the call fails it, with a message that names the problem."""

from align.testing import RewardConformance

pytest_plugins = ["pytester"]


class TestAdditionReward(RewardConformance):
    reward = "addition"  # a required field, `answer`: the suite makes its values


class TestAdditionRewardWithWorking(RewardConformance):
    reward = "addition"
    options = {"working": True}
    records = [
        {"prompt": "What is 7 + 12?", "answer": 19},
        {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": 5},
    ]
    completions = ["7 + 12 = 19.", "19", "2 + 3 = 5", "2 + 4 = 5"]


class TestLengthReward(RewardConformance):
    reward = "length"


class TestLengthRewardWithOptions(RewardConformance):
    reward = "length"
    options = {"cache": 8}
    config = {"max_completion_length": 24}


class TestFormatReward(RewardConformance):
    reward = "format"


BROKEN_REWARDS = """
import math
import random

import align

_RNG = random.Random()  # a generator of its own, which nothing seeds


def short(completions):
    return [1.0] * (len(completions) - 1)  # one value too few


def words(completions):
    return ["good" if "5" in str(c) else "bad" for c in completions]


def nonfinite(completions):
    return [1.0 if c else math.nan for c in completions]  # NaN for an empty completion


def noisy(completions):
    return [_RNG.random() for _ in completions]


def relative(completion_ids):
    lengths = [len(ids) for ids in completion_ids]
    return [n / sum(lengths) for n in lengths]  # normalised over the call


@align.hookimpl
def align_register_rewards(register):
    for function in (short, words, nonfinite, noisy, relative):
        register(align.Reward(function.__name__, "a broken reward", function))
"""

BROKEN_SUITE = """
import broken_rewards
from align.testing import RewardConformance

{classes}
"""

CLASS = """
class Test{camel}(RewardConformance):
    reward = "{name}"
    plugin = broken_rewards
"""


def test_the_suite_fails_broken_rewards_naming_the_problem(pytester, monkeypatch):
    names = ["short", "words", "nonfinite", "noisy", "relative"]
    classes = "".join(CLASS.format(camel=n.capitalize(), name=n) for n in names)
    pytester.makepyfile(
        broken_rewards=BROKEN_REWARDS, test_broken_rewards=BROKEN_SUITE.format(classes=classes)
    )
    monkeypatch.setenv("ALIGN_PLUGINS", "")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-rfs")
    output = result.stdout.str()
    failed_by_class: dict[str, set[str]] = {}
    for line in output.splitlines():
        if line.startswith("FAILED "):
            _, cls, check = line.split(" ")[1].split("::")
            failed_by_class.setdefault(cls, set()).add(check)
    assert failed_by_class == {
        "TestShort": {"test_one_value_per_completion", "test_two_halves_score_as_one_call"},
        "TestWords": {"test_values_are_real_numbers"},
        "TestNonfinite": {"test_values_are_finite"},
        "TestNoisy": {"test_same_completions_same_seed_same_values"},
        "TestRelative": {"test_two_halves_score_as_one_call"},
    }, output
    result.assert_outcomes(failed=6, passed=23, skipped=1)  # skipped: noisy's halves
    assert "reward 'short' (broken_rewards) returned 7 values for 8 completions" in output
    assert "reward 'words' (broken_rewards) returned values that are not real numbers" in output
    assert "str 'bad'" in output
    assert "reward 'nonfinite' (broken_rewards) returned values that are not finite" in output
    assert "completion 5 (records[2], plain prompt, '')" in output
    assert "reward 'noisy' (broken_rewards) is not deterministic" in output
    assert "reward 'relative' (broken_rewards) depends on the other completions of a call" in output
    assert "in a call of 4" in output
