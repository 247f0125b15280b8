"""Who forgets less? SFT, MinorSFT and IFT fine-tuning a model on a new task, through
``align compare``: the table README gives for MinorSFT and IFT.

    python benchmarks/forgetting.py                      # in a scratch directory
    python benchmarks/forgetting.py --workdir DIR        # reuses what DIR already holds
    python benchmarks/forgetting.py --steps 150 --seeds 2

1. Task A: SFT of the demo model on the demo's addition, 12 epochs (``runs/task-a``; the
   pipeline demo's starting policy), unless DIR holds it.
2. Task B, made here: subtraction in the same chat format ("What is 47 - 12?" →
   "47 - 12 = 35.", "What is 3 - 20?" → "3 - 20 = -17."), 2,000 training and 200 held-out
   questions of the 2,500 over 0..49.
3. ``align compare`` from the task-A model on task B: ``--objective sft,minorsft,ift`` ×
   ``--lr`` × MinorSFT's β ∈ {0.1, 0.01} × seeds, ``--max-steps`` steps of batch 16, each run
   evaluated on 200 held-out subtractions (``sub``, learned) and the demo's 200 held-out
   additions (``add``, to keep): greedy exact-answer accuracy (``--eval-reward addition``: the
   answer's last number equals ``answer``) and the answers' NLL (nats per answer token).

Every command is a fresh process with ``OMP_NUM_THREADS=1`` unless the environment sets it;
the time of each stage is printed. The comparison's table is
``DIR/compare-<steps>-steps/results.md``, its plot ``kept-vs-learned.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK_A = ["run", "--objective", "sft", "--epochs", "12", "--output-dir", "runs/task-a"]


def align(args: list[str], workdir: Path) -> float:
    """Run ``align ARGS`` in ``workdir`` (its output streamed); its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "align.cli", *args], cwd=workdir, env=env)
    if done.returncode:
        sys.exit(f"align {' '.join(args)} failed (exit {done.returncode})")
    return time.perf_counter() - start


def _chat(question: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": answer}],
    }


def write_subtraction(workdir: Path) -> None:
    """Task B: every (a, b) in 0..49, shuffled, 2,000 to train and 200 held out."""
    pairs = [(a, b) for a in range(50) for b in range(50)]
    random.Random(30).shuffle(pairs)
    for name, chosen in (("sub_train", pairs[:2000]), ("sub_eval", pairs[2000:2200])):
        with open(workdir / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for a, b in chosen:
                record = _chat(f"What is {a} - {b}?", f"{a} - {b} = {a - b}.")
                handle.write(json.dumps({**record, "answer": a - b}) + "\n")


def write_addition_eval(workdir: Path) -> None:
    """Task A's held-out set: the demo's 200 held-out sums, with their ``answer``."""
    from align.demo import demo_data

    with open(workdir / "add_eval.jsonl", "w", encoding="utf-8") as handle:
        for line in demo_data("prompt_completion", "eval").read_text().splitlines():
            question, answer = json.loads(line)["messages"]
            a, b = (int(n) for n in question["content"][8:-1].split(" + "))
            record = _chat(question["content"], answer["content"])
            handle.write(json.dumps({**record, "answer": a + b}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--betas", default="0.1,0.01")
    parser.add_argument("--objectives", default="sft,minorsft,ift")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="align-forgetting-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {workdir}", flush=True)
    if not (workdir / "runs/task-a/final").exists():
        print(f"task A (addition): {align(TASK_A, workdir):.0f} s", flush=True)
    write_subtraction(workdir)
    write_addition_eval(workdir)
    command = ["compare", "--objective", args.objectives, "--lr", args.lrs]
    command += ["--set", f"beta={args.betas}", "--seeds", str(args.seeds)]
    command += ["--model", "runs/task-a/final", "--data", "sub_train.jsonl"]
    command += ["--max-steps", str(args.steps), "--batch-size", "16"]
    target = f"compare-{args.steps}-steps"
    command += ["--eval-max-tokens", "16", "--output-dir", target]
    command += ["--eval", "sub=sub_eval.jsonl", "--eval", "add=add_eval.jsonl"]
    command += ["--eval-reward", "addition"]
    if (workdir / target / "compare.json").exists():
        command.append("--resume")
    seconds = align(command, workdir)
    print(f"\nalign {' '.join(command)}: {seconds:.0f} s")
    print((workdir / target / "results.md").read_text())


if __name__ == "__main__":
    main()
