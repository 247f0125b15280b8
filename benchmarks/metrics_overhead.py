"""What TRL's token metrics cost a training step: SFT's and DPO's, with and without them.

    OMP_NUM_THREADS=1 python benchmarks/metrics_overhead.py
    OMP_NUM_THREADS=1 python benchmarks/metrics_overhead.py --objectives dpo --steps 5 --repeat 5

SFT logs ``entropy`` and DPO ``entropy`` and ``logits/chosen`` / ``logits/rejected`` (the mean
over the vocabulary of the logits at each completion token): both come from the chunks of
logits the output head already forms for the log-probs (``align.model.head``), under no
gradient. This measures what that adds to a whole step (forward, backward, AdamW) of the
plugins' own losses on the ``realistic`` workload of ``against_trl.py``: a 4-layer Llama, 256
wide, a 32,000-token vocabulary, micro-batches of ``--batch`` (8) examples (DPO: pairs) with
prompts of 100-300 tokens and completions of 50-200 (sequences up to 500), padding-free as a
run is by default, float32 on the CPU.

- ``before``: the same loss with the head asked for neither (``align.forward_logps`` without
  ``entropy`` and ``mean_logits``; the metrics then read zeros, so the sums are still done);
- ``after``: the plugin's loss as it runs.

Each repeat times ``--steps`` steps of each, interleaved (before, after, before, …, each after
one warm-up step), so a slow spell of a shared machine hits both; the table shows the median
seconds per step over the repeats and the ratio after/before.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from typing import Any

import torch

import align

VOCAB, HIDDEN, LAYERS = 32000, 256, 4


def model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).train()


def tokens(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))]


def batch(objective: str, size: int, seed: int) -> dict[str, Any]:
    from align.data.batching import every_sequence_batch
    from align.data.packing import pack_in_order

    rng = random.Random(seed)
    prompts = [tokens(rng, 100, 300) for _ in range(size)]
    if objective == "sft":
        rows = []
        for prompt in prompts:
            answer = tokens(rng, 50, 200)
            rows.append(
                {
                    "input_ids": prompt + answer,
                    "completion_mask": [0] * len(prompt) + [1] * len(answer),
                }
            )
        return every_sequence_batch(rows, 0, packed=True)
    groups = []
    for prompt in prompts:
        pair = [tokens(rng, 50, 200) for _ in range(2)]
        groups.append([(prompt + a, [0] * len(prompt) + [1] * len(a)) for a in pair])
    return pack_in_order(groups, [[i, size + i] for i in range(size)], 0)


class SelfReference:
    """The policy's own sequence log-probs, without gradient (what the loss reads of a
    reference; its cost is the same in both variants)."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def sequence_logps(self, batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
        with torch.no_grad():
            return align.forward_logps(self.policy, batch, prefix).sums


@contextlib.contextmanager
def without_metrics():
    """``align.forward_logps`` as before the metrics: neither entropy nor mean logits."""
    real = align.forward_logps

    def before(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("entropy", None), kwargs.pop("mean_logits", None)
        out = real(*args, **kwargs)
        out.entropy = torch.zeros_like(out.logps)
        out.mean_logits = torch.zeros_like(out.logps)
        return out

    align.forward_logps = before
    try:
        yield
    finally:
        del align.forward_logps  # back to the lazy attribute


def loss_fn(objective: str, policy: Any):
    if objective == "sft":
        import align_sft

        options = align_sft.SFTOptions()
        return lambda b: align_sft.align_compute_loss(model=policy, batch=b, options=options)
    import align_dpo

    options, reference = align_dpo.DPOOptions(), SelfReference(policy)
    return lambda b: align_dpo.align_compute_loss(
        model=policy, batch=b, options=options, reference=reference
    )


def time_steps(compute, optimizer, batches, metrics: bool) -> float:
    """Seconds per step over ``batches`` (after one warm-up step)."""
    context = contextlib.nullcontext() if metrics else without_metrics()
    with context:
        elapsed = []
        for i, b in enumerate(batches):
            start = time.perf_counter()
            output = compute(b)
            (output.loss / output.count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            assert ("entropy" in output.metrics) and torch.isfinite(output.metrics["entropy"][0])
            if i:
                elapsed.append(time.perf_counter() - start)
    return statistics.fmean(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", default="sft,dpo")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(
        f"torch threads {torch.get_num_threads()}; Llama {LAYERS}×{HIDDEN}, vocabulary {VOCAB}, "
        f"batch {args.batch}, {args.steps} steps a repeat, {args.repeat} repeats"
    )
    rows = []
    for objective in args.objectives.split(","):
        policy = model()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        compute = loss_fn(objective, policy)
        batches = [batch(objective, args.batch, seed) for seed in range(args.steps + 1)]
        times: dict[str, list[float]] = {"before": [], "after": []}
        for repeat in range(args.repeat):
            for variant in ("before", "after"):
                seconds = time_steps(compute, optimizer, batches, variant == "after")
                times[variant].append(seconds)
                print(
                    f"{objective} repeat {repeat + 1} {variant}: {seconds:.3f} s/step", flush=True
                )
        before, after = (statistics.median(times[v]) for v in ("before", "after"))
        rows.append((objective, before, after, after / before))
    print("\n| objective | before s/step | after s/step | after/before |")
    print("| --- | --- | --- | --- |")
    for objective, before, after, ratio in rows:
        print(f"| {objective} | {before:.3f} | {after:.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
