"""The post-training pipeline on the embedded demo, stage by stage, with the figures README gives.

    python benchmarks/pipeline_demo.py                 # in a scratch directory: runs/ is written
    python benchmarks/pipeline_demo.py --workdir DIR   # reuses the stages DIR/runs/ already holds

Stages (each an ``align run``; one whose ``final/`` exists is not run again):

1. ``sft-demo``: SFT of the demo model, 12 epochs (the teacher and the starting policy).
2. ``rm``: ``reward-model`` from it on the demo's preference pairs: held-out pair accuracy.
3. ``grpo-rm``: GRPO from the SFT model rewarded by that reward model (``--reward
   model:runs/rm/final``), ``addition`` logged at weight 0: the held-out accuracy before (step 0)
   and after (step 300).
4. ``grpo-demo``: the same GRPO rewarded by ``addition``, for comparison.
5. ``sft-small``: SFT of ``--model demo-small`` (2 layers, 64 wide) on the same data, 12 epochs.
6. ``distill``: ``distill`` of ``demo-small`` from the SFT model on the same prompts (forward KL,
   ``--set beta=0``, lr 3e-3, 1500 steps).

Held-out accuracy is one measure for every model: ``eval_rewards/addition/mean`` of a GRPO run's
step-0 evaluation (``--eval-on-start``, the demo's on-policy settings): 200 held-out sums × 8
samples at temperature 1, the same seeds for every model, the mean over all 1,600 completions.
The reward model is also scored on held-out answers of the SFT model's own form with the sum off
by one ("7 + 12 = 20."), which is what the policy's samples look like.

Every run is a fresh process with ``OMP_NUM_THREADS=1`` unless the environment sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {
    "sft-demo": ["--objective", "sft", "--epochs", "12"],
    "rm": ["--objective", "reward-model", "--model", "runs/sft-demo/final", "--data", "demo"],
    "grpo-rm": ["--objective", "grpo", "--model", "runs/sft-demo/final", "--data", "demo"]
    + ["--reward", "model:runs/rm/final", "--reward", "addition=0"],
    "grpo-demo": ["--objective", "grpo", "--model", "runs/sft-demo/final", "--data", "demo"],
    "sft-small": ["--objective", "sft", "--model", "demo-small", "--epochs", "12"],
    "distill": ["--objective", "distill", "--model", "demo-small", "--data", "demo"]
    + ["--teacher", "runs/sft-demo/final", "--set", "beta=0", "--lr", "3e-3"]
    + ["--max-steps", "1500", "--eval-every", "500"],
}
ACCURACY = "eval_rewards/addition/mean"


def align(args: list[str], workdir: Path) -> float:
    """Run ``align ARGS`` in ``workdir``; its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    command = [sys.executable, "-m", "align.cli", *args]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"align {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def evals(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows(run) if key in r}


def held_out_accuracy(model: str, workdir: Path) -> float:
    """The measure above: a one-step GRPO run's step-0 evaluation of ``model``."""
    name = "acc-" + model.replace("/", "-")
    out = workdir / "runs" / name
    if not (out / "final").exists():
        base = ["run", "--objective", "grpo", "--model", model, "--data", "demo"]
        align([*base, "--max-steps", "1", "--output-dir", f"runs/{name}"], workdir)
    return evals(out, ACCURACY)[0]


def same_form_accuracy(workdir: Path) -> float:
    """The share of held-out sums on which the reward model scores "a + b = sum." above
    "a + b = sum + 1." (both the SFT model's form)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align import demo

    path = workdir / "runs" / "rm" / "final"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    records = [
        json.loads(line)
        for line in demo.demo_data("prompt_only", "eval").read_text().split("\n")
        if line
    ]

    def score(prompt: list[dict], answer: str) -> float:
        chat = [*prompt, {"role": "assistant", "content": answer}]
        ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    right = 0
    for record in records:
        question = record["prompt"][-1]["content"]  # "What is 38 + 4?"
        sum_ = question.removeprefix("What is ").removesuffix("?")
        good = score(record["prompt"], f"{sum_} = {record['answer']}.")
        bad = score(record["prompt"], f"{sum_} = {record['answer'] + 1}.")
        right += good > bad
    return right / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where runs/ goes (default: a new temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="align-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for name, flags in STAGES.items():
        if (workdir / "runs" / name / "final").exists():
            print(f"{name}: already in {workdir}/runs/{name}")
            continue
        seconds = align(["run", *flags, "--output-dir", f"runs/{name}"], workdir)
        print(f"{name}: {seconds:.0f} s")
    runs = workdir / "runs"
    rm = rows(runs / "rm")[-1]
    print(
        f"reward model, held-out pairs: accuracy {rm['eval_accuracy']:.3f}, margin "
        f"{rm['eval_margin']:.2f}; same-form pairs (sum off by one): "
        f"{same_form_accuracy(workdir):.3f}"
    )
    for name in ("grpo-rm", "grpo-demo"):
        curve = ", ".join(f"step {s}: {v:.3f}" for s, v in evals(runs / name, ACCURACY).items())
        print(f"{name}: held-out accuracy {curve}")
    rm_curve = evals(runs / "grpo-rm", "eval_rewards/rm/mean")
    print(
        "grpo-rm: held-out reward-model score "
        + ", ".join(f"step {s}: {v:.2f}" for s, v in rm_curve.items())
    )
    for model in ("runs/sft-demo/final", "runs/sft-small/final", "runs/distill/final"):
        print(f"{model}: held-out accuracy {held_out_accuracy(model, workdir):.3f}")


if __name__ == "__main__":
    main()
