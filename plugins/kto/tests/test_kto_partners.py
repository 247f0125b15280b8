"""Mismatched partners: fixed per split, never the example's own prompt, independent of batching."""

import pytest

import align
from align_kto.partners import add_mismatched_partners, prompt_length, warn_if_imbalanced


def _example(prompt, completion, label=True, prompt_id=None):
    return {
        "input_ids": [1, *prompt, *completion],
        "completion_mask": [0] * (1 + len(prompt)) + [1] * len(completion),
        "label": label,
        "prompt_id": prompt_id or str(prompt),
    }


def _split_pairs(n):
    """Paired data split into a desirable and an undesirable example per prompt."""
    examples = []
    for i in range(n):
        examples.append(_example([10 + i, 10 + i], [50 + i], True))
        examples.append(_example([10 + i, 10 + i], [80 + i, 80 + i], False))
    return examples


def test_partner_is_own_prompt_with_another_prompts_completion():
    examples = add_mismatched_partners(_split_pairs(5), seed=3, max_length=64, split="train")
    completions = {tuple(e["input_ids"][prompt_length(e) :]) for e in examples}
    for example in examples:
        p = prompt_length(example)
        ids, mask = example["mismatched_input_ids"], example["mismatched_completion_mask"]
        assert ids[:p] == example["input_ids"][:p] and mask[:p] == [0] * p
        partner_completion = tuple(ids[p:])
        assert partner_completion in completions and all(mask[p:])
        own_prompt_completions = {
            tuple(e["input_ids"][prompt_length(e) :])
            for e in examples
            if e["prompt_id"] == example["prompt_id"]
        }
        assert partner_completion not in own_prompt_completions  # not the other answer either


def test_prompts_are_told_apart_by_prompt_id_not_tokens():
    """keep_end truncation may cut a split pair's two prompts differently; they stay one prompt."""
    examples = []
    for i in range(4):
        examples.append(_example([10 + i] * 3, [50 + i], True, prompt_id=f"p{i}"))
        examples.append(_example([10 + i] * 2, [80 + i], False, prompt_id=f"p{i}"))  # cut more
    for seed in range(20):
        for example in add_mismatched_partners(examples, seed, max_length=64, split="train"):
            p = prompt_length(example)
            partner = example["mismatched_input_ids"][p:]
            own = [e["input_ids"][prompt_length(e) :] for e in examples]
            owner = examples[own.index(partner)]
            assert owner["prompt_id"] != example["prompt_id"], seed


def test_a_dominant_prompt_is_linear_and_warned_about():
    many = [_example([7] * 50, [8], prompt_id="same") for _ in range(20_000)]
    with pytest.warns(UserWarning, match="20000 of 20001 examples share one prompt"):
        examples = add_mismatched_partners([*many, _example([9], [6])], 0, 64, "train")
    assert all(e["mismatched_input_ids"][-1] == 6 for e in examples[:-1])


def test_partners_are_fixed_by_the_seed():
    first = add_mismatched_partners(_split_pairs(6), seed=1, max_length=64, split="train")
    again = add_mismatched_partners(_split_pairs(6), seed=1, max_length=64, split="train")
    other = add_mismatched_partners(_split_pairs(6), seed=2, max_length=64, split="train")
    key = [e["mismatched_input_ids"] for e in first]
    assert key == [e["mismatched_input_ids"] for e in again]
    assert key != [e["mismatched_input_ids"] for e in other]


def test_a_single_prompt_is_an_error():
    examples = [_example([5], [6]), _example([5], [7], False)]
    with pytest.raises(align.DataError, match="^e.jsonl: KTO needs at least two different prompts"):
        add_mismatched_partners(examples, seed=0, max_length=64, split="eval", source="e.jsonl")


def test_over_long_partners_lose_the_start_of_the_prompt_and_are_counted():
    examples = [_example([2] * 6, [3]), _example([4], [5] * 6)]
    with pytest.warns(UserWarning, match="1 mismatched pairs were longer than max_length 8"):
        prepared = add_mismatched_partners(examples, seed=0, max_length=8, split="train")
    long = prepared[0]
    assert len(long["mismatched_input_ids"]) == 8
    assert long["mismatched_input_ids"][-6:] == [5] * 6  # the partner's completion is whole


@pytest.mark.parametrize(
    ("desirable", "undesirable", "weights", "warns"),
    [
        (50, 50, (1.0, 1.0), False),
        (40, 60, (1.0, 1.0), True),
        (40, 60, (1.6, 1.0), False),  # 1.6·40/60 ≈ 1.07
        (10, 0, (1.0, 1.0), True),
    ],
)
def test_imbalance_warning(recwarn, desirable, undesirable, weights, warns):
    examples = [{"label": True}] * desirable + [{"label": False}] * undesirable
    warn_if_imbalanced(examples, *weights)
    messages = [str(w.message) for w in recwarn]
    assert bool(messages) == warns, messages
    if desirable == 40 and warns:
        assert "set desirable_weight between 1.5 and 2" in messages[0]
