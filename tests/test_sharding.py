"""Micro-batches per process, and grouping them by length."""

import random
import statistics
from types import SimpleNamespace

from align.data.sharding import ShardedBatches
from align.data.store import example_length

ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0, device="cpu")


def _examples(n=1000):
    rng = random.Random(0)
    return [{"input_ids": [1] * rng.randint(5, 500), "completion_mask": []} for _ in range(n)]


def _batches(examples, grouped, epoch=0, accelerator=ONE_PROCESS, batch_size=8):
    loader = ShardedBatches(
        examples, batch_size, lambda e: e, accelerator, True, 42, "train", grouped
    )
    loader.set_epoch(epoch)
    return [[int(i) for i in batch] for batch in loader._batches()]


def _spread(examples, batches):
    """Mean over batches of (longest − shortest) example in the batch."""
    return statistics.fmean(
        max(example_length(examples[i]) for i in b) - min(example_length(examples[i]) for i in b)
        for b in batches
    )


def test_grouping_by_length_keeps_every_example_once_and_batches_similar_lengths():
    examples = _examples()
    plain, grouped = _batches(examples, False), _batches(examples, True)
    assert sorted(i for b in grouped for i in b) == list(range(len(examples)))
    assert [len(b) for b in grouped] == [len(b) for b in plain]
    assert _spread(examples, grouped) < _spread(examples, plain) / 10
    longest = max(example_length(e) for e in examples)
    assert max(example_length(examples[i]) for i in grouped[0]) == longest  # fails early
    assert grouped == _batches(examples, True)  # deterministic: --resume rebuilds it
    assert grouped != _batches(examples, True, epoch=1)  # another order each epoch


def test_grouping_by_length_across_processes_shares_out_every_example():
    examples = _examples(203)
    seen = []
    for rank in (0, 1):
        accelerator = SimpleNamespace(num_processes=2, process_index=rank, device="cpu")
        batches = _batches(examples, True, accelerator=accelerator, batch_size=4)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(203))
