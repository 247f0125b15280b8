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
over the repeats of the seconds per step and the ratio after/before. Times are the process's CPU
time (``time.process_time``, page faults included): with ``OMP_NUM_THREADS=1`` that is the
step's compute, which other processes on a loaded machine do not inflate as they do the wall
time (printed too, per repeat).

A step's time on a shared machine varies by more than the metrics cost, so the output head
alone is timed too (``--head-rows`` trained positions, SFT's ≈ 1,000 at batch 8, through the
32,000-token head, forward and backward, ``--head-repeat`` interleaved pairs): the metrics'
whole cost is there, and its median ratio is the precise figure.
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


def time_steps(compute, optimizer, batches, metrics: bool) -> tuple[float, float]:
    """CPU and wall seconds per step over ``batches`` (after one warm-up step)."""
    context = contextlib.nullcontext() if metrics else without_metrics()
    with context:
        elapsed, wall = [], []
        for i, b in enumerate(batches):
            start, start_wall = time.process_time(), time.perf_counter()
            output = compute(b)
            (output.loss / output.count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            assert ("entropy" in output.metrics) and torch.isfinite(output.metrics["entropy"][0])
            if i:
                elapsed.append(time.process_time() - start)
                wall.append(time.perf_counter() - start_wall)
    return statistics.fmean(elapsed), statistics.fmean(wall)


def head_times(rows: int, repeat: int) -> tuple[float, float]:
    """Median CPU seconds of the head's forward and backward without and with the metrics."""
    from align.model.head import hidden_target_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(rows, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (rows,))
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeat + 1):
        for metrics in (False, True):
            start = time.process_time()
            out = hidden_target_logps(hidden, targets, head, entropy=metrics, mean_logits=metrics)
            out.logps.sum().backward()
            times[metrics].append(time.process_time() - start)
            head.zero_grad(set_to_none=True)
            hidden.grad = None
    return statistics.median(times[False][1:]), statistics.median(times[True][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", default="sft,dpo")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--head-rows", type=int, default=1000)
    parser.add_argument("--head-repeat", type=int, default=20)
    args = parser.parse_args()
    print(
        f"torch threads {torch.get_num_threads()}; Llama {LAYERS}×{HIDDEN}, vocabulary {VOCAB}, "
        f"batch {args.batch}, {args.steps} steps a repeat, {args.repeat} repeats"
    )
    rows = []
    for objective in [o for o in args.objectives.split(",") if o]:
        policy = model()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        compute = loss_fn(objective, policy)
        batches = [batch(objective, args.batch, seed) for seed in range(args.steps + 1)]
        times: dict[str, list[float]] = {"before": [], "after": []}
        for repeat in range(args.repeat):
            for variant in ("before", "after"):
                seconds, wall = time_steps(compute, optimizer, batches, variant == "after")
                times[variant].append(seconds)
                what = f"{objective} repeat {repeat + 1} {variant}"
                print(f"{what}: {seconds:.3f} CPU s/step ({wall:.3f} wall)", flush=True)
        before, after = (statistics.median(times[v]) for v in ("before", "after"))
        rows.append((objective, before, after, after / before))
    before, after = head_times(args.head_rows, args.head_repeat)
    rows.append((f"head alone, {args.head_rows} rows", before, after, after / before))
    print("\n| what | before CPU s | after CPU s | after/before |")
    print("| --- | --- | --- | --- |")
    for objective, before, after, ratio in rows:
        print(f"| {objective} | {before:.4f} | {after:.4f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
