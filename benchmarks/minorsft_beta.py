"""MinorSFT's weight across β and answer lengths: where it collapses, and what that costs.

    python benchmarks/minorsft_beta.py                      # 3 lengths, the demo's 500 steps
    python benchmarks/minorsft_beta.py --lengths short --seed 1  # another data order

MinorSFT scales each example's SFT gradient by 2σ(−βΔ), with Δ = logπθ(y|x) − logπref(y|x)
summed over the answer's m tokens. Writing Δ = m·δ (δ the per-token log-ratio, the logged
``deviation``), the weight is 2σ(−β·m·δ): for a fixed per-token move, the β at which learning
stalls scales as 1/m. This script measures it on the embedded demo (a 4-layer Llama learning
two-number addition from random weights, the reference being those random weights) with the
same prompts and three answer lengths, made here from the demo's records:

- ``short``: the demo's own answers, "38 + 4 = 42." (7 completion tokens with EOS);
- ``working``: the working first, "8 + 4 = 12, 3 + 0 + 1 = 4, so 38 + 4 = 42." (~3.4×);
- ``words``: the working in words, "The ones: 8 + 4 = 12. The tens: 3 + 0 + 1 = 4. So
  38 + 4 = 42." (~6×).

For each length it trains SFT with per-sequence means (MinorSFT's gradient at the start), the
paper's MinorSFT at β 0.1, 0.03, 0.01, 0.003, and the ``length_normalized`` option (Δ/m inside σ)
at β 1, 0.3, 0.1 — each for the same steps with the demo's settings (lr 3e-3, batch 16, cosine,
10 warm-up steps) — and prints a Markdown table of the weight at the end of training (train and
held-out), the held-out NLL (token mean, the demo's 200 eval prompts in the same format), the
deviation δ (the paper's m_θ, mean Δ/m against the starting model) and 2σ(−β·m·δ) computed
from the means, which tracks the measured weight.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

SUMMED_BETAS = (0.1, 0.03, 0.01, 0.003)
NORMALIZED_BETAS = (1.0, 0.3, 0.1)


def _short(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}."


def _working(a: int, b: int) -> str:
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    working = f"{a % 10} + {b % 10} = {ones}, {a // 10} + {b // 10} + {carry} = {tens}"
    return f"{working}, so {_short(a, b)}"


def _words(a: int, b: int) -> str:
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    return (
        f"The ones: {a % 10} + {b % 10} = {ones}. The tens: {a // 10} + {b // 10} + {carry} = "
        f"{tens}. So {_short(a, b)}"
    )


LENGTHS = {"short": _short, "working": _working, "words": _words}


def write_split(work: Path, length: str, split: str) -> Path:
    """The demo's addition records for ``split``, each answer rewritten as ``length`` says, in a
    JSONL file under ``work``."""
    from align import demo

    lines = []
    for line in demo.demo_data("prompt_completion", split).read_text().splitlines():
        messages = json.loads(line)["messages"]
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", messages[0]["content"]).groups())
        assert messages[1]["content"] == _short(a, b), messages
        answer = {"role": "assistant", "content": LENGTHS[length](a, b)}
        lines.append(json.dumps({"messages": [messages[0], answer]}))
    path = work / f"{length}_{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def eval_examples(path: Path, tokenizer) -> list[dict]:
    from align.data.examples import tokenize_records
    from align.data.records import read_records

    examples, _ = tokenize_records(
        read_records(path), "prompt_completion", tokenizer, 128, "error", "eval"
    )
    return examples


def mean_completion_tokens(path: Path) -> float:
    from transformers import AutoTokenizer

    from align import demo

    examples = eval_examples(path, AutoTokenizer.from_pretrained(demo.demo_model_path()))
    return sum(sum(e["completion_mask"]) for e in examples) / len(examples)


def held_out_nll(model, tokenizer, path: Path) -> float:
    """Token-mean NLL of the answers in ``path`` (SFT's eval loss is a per-sequence mean)."""
    import torch

    from align import default_batch, forward_logps

    examples = eval_examples(path, tokenizer)
    nll = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            batch = default_batch("prompt_completion", examples[i : i + 64], tokenizer.pad_token_id)
            out = forward_logps(model, {k: v.to(model.device) for k, v in batch.items()})
            nll -= out.sums.sum().item()
            tokens += out.num_tokens.sum().item()
    return nll / tokens


def train(
    objective: str, train_path: Path, eval_path: Path, steps: int, seed: int, out: Path, **options
):
    import align

    result = align.train(
        objective,
        model="demo",
        data=str(train_path),
        eval_data=str(eval_path),
        lr=3e-3,
        batch_size=16,
        max_steps=steps,
        seed=seed,
        eval_every=steps,
        max_length=128,
        output_dir=str(out),
        **options,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default=",".join(LENGTHS), help="of: " + ", ".join(LENGTHS))
    parser.add_argument("--steps", type=int, default=500, help="the demo's 4 epochs: 500")
    parser.add_argument("--seed", type=int, default=42, help="the data order (align's default)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directories")
    args = parser.parse_args()
    lengths = args.lengths.split(",")
    unknown = sorted(set(lengths) - set(LENGTHS))
    if unknown:
        parser.error(f"unknown length(s) {unknown}; choose from {list(LENGTHS)}")

    work = Path(tempfile.mkdtemp(prefix="align-minorsft-beta-"))
    print(
        f"demo addition, {args.steps} steps per run, lr 3e-3, batch 16, seed {args.seed}; "
        f"runs under {work} (removed at the end unless --keep)\n"
    )
    header = (
        "| answers | m | objective | β | train weight | eval weight | 2σ(−β·m·δ) "
        "| eval NLL | deviation δ |"
    )
    print(header)
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    start = time.perf_counter()
    for length in lengths:
        train_path = write_split(work, length, "train")
        eval_path = write_split(work, length, "eval")
        m = mean_completion_tokens(eval_path)
        grid = [("sft", None, {"normalization": "sequence"})]
        grid += [("minorsft", b, {"beta": b}) for b in SUMMED_BETAS]
        grid += [
            ("minorsft, Δ/m", b, {"beta": b, "length_normalized": True}) for b in NORMALIZED_BETAS
        ]
        for name, beta, options in grid:
            objective = name.split(",")[0]
            tag = f"{length}-{objective}-{beta}-{'n' if 'length_normalized' in options else 's'}"
            result = train(
                objective,
                train_path,
                eval_path,
                args.steps,
                args.seed,
                work / tag,
                eval_deviation=objective == "sft",
                **options,
            )
            metrics = result.metrics
            delta = metrics["eval_deviation"]
            if beta is None:
                weights = "— | — | —"
            else:
                x = beta * delta * (1 if "length_normalized" in options else m)
                predicted = 2 / (1 + math.exp(x))
                train_w, eval_w = metrics["minor_weight"], metrics["eval_minor_weight"]
                weights = f"{train_w:.3g} | {eval_w:.3g} | {predicted:.3g}"
            nll = held_out_nll(result.model, result.tokenizer, eval_path)
            print(
                f"| {length} | {m:.1f} | {name} | {beta if beta is not None else '—'} "
                f"| {weights} | {nll:.3f} | {delta:.2f} |",
                flush=True,
            )
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.keep:
        print(f"runs kept under {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
