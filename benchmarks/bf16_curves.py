"""bf16 autocast against float32: the loss curve of one demo epoch, and the time it took.

    python benchmarks/bf16_curves.py                    # sft, dpo and kto on the demo
    python benchmarks/bf16_curves.py --objectives dpo --steps-shown 25

Each objective trains one epoch of the demo data (2000 records, batch 8, 250 steps, the same
seed) twice, with ``--precision no`` and ``--precision bf16``, in fresh processes with empty
reference caches. Printed: the loss every ``--steps-shown`` steps for both, the largest and the
mean absolute difference over all 250 steps, and each run's seconds (``run.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def train(objective: str, precision: str, work: Path) -> tuple[list[float], float]:
    from align import demo

    fmt = {"sft": "prompt_completion", "dpo": "preference", "kto": "feedback"}[objective]
    out = work / f"{objective}-{precision}"
    command = [sys.executable, "-m", "align.cli", "run", "--objective", objective]
    command += ["--model", str(demo.demo_model_path()), "--data", str(demo.demo_data(fmt, "train"))]
    command += ["--batch-size", "8", "--max-length", "64", "--lr", "1e-4", "--precision", precision]
    command += ["--output-dir", str(out)]
    env = {**os.environ, "ALIGN_CACHE": str(work / f"cache-{objective}-{precision}")}
    env["TQDM_DISABLE"] = "1"
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = json.loads((out / "run.json").read_text())["seconds"]
    return [r["loss"] for r in rows if "loss" in r], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", default="sft,dpo,kto")
    parser.add_argument("--steps-shown", type=int, default=50)
    parser.add_argument("--json", default="benchmark-bf16.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align-bf16-"))
    results = {}
    for objective in args.objectives.split(","):
        fp32, fp32_s = train(objective, "no", work)
        bf16, bf16_s = train(objective, "bf16", work)
        gaps = [abs(a - b) for a, b in zip(fp32, bf16, strict=True)]
        shown = list(range(0, len(fp32), args.steps_shown)) + [len(fp32) - 1]
        print(f"\n{objective}: fp32 {fp32_s:.1f}s, bf16 {bf16_s:.1f}s ({fp32_s / bf16_s:.2f}x)")
        print("  step " + " ".join(f"{i + 1:>7}" for i in shown))
        print("  fp32 " + " ".join(f"{fp32[i]:7.4f}" for i in shown))
        print("  bf16 " + " ".join(f"{bf16[i]:7.4f}" for i in shown))
        print(f"  |bf16 - fp32|: max {max(gaps):.4f}, mean {statistics.fmean(gaps):.4f}")
        results[objective] = {
            "fp32_loss": fp32,
            "bf16_loss": bf16,
            "fp32_seconds": fp32_s,
            "bf16_seconds": bf16_s,
            "max_abs_gap": max(gaps),
            "mean_abs_gap": statistics.fmean(gaps),
        }
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
