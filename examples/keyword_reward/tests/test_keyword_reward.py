"""The keyword reward: its values, and its field read from the data file by the core."""

import align
import align_keyword_reward as plugin
from align.testing import RewardConformance


def test_the_reward_reads_plain_and_chat_completions():
    chat = [{"role": "assistant", "content": "The answer is 42."}]
    assert plugin.contains_keyword(["42 it is", "no", chat], ["42", "42", "42"]) == [1.0, 0.0, 1.0]


def test_it_registers_with_its_field():
    got = []
    plugin.align_register_rewards(got.append)
    (reward,) = got
    assert isinstance(reward, align.Reward) and reward.name == "keyword"
    assert list(reward.fields.model_fields) == ["keyword"]


class TestKeywordConformance(RewardConformance):
    """One value per completion, real and finite, the same under one seed and in two halves."""

    reward = "keyword"
    plugin = plugin
