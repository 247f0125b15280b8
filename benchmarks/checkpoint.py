"""What checkpoints and resuming cost: seconds per checkpoint, its size, and resume set-up.

    python benchmarks/checkpoint.py            # a 27M-parameter Llama, full fine-tuning and LoRA

For each policy it runs ``--steps`` SFT steps twice, without checkpoints and with
``--save-every 1`` (the difference per step is the cost of one checkpoint), then resumes the
second run from its middle checkpoint and reports the resumed run's wall time (set-up, loading
the checkpoint, and the second half of the steps).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from preference import build_wide_model, subset  # noqa: E402


def _align(*args: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    command = [sys.executable, "-m", "align.cli", "run", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - started


def _size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from align import demo

    work = Path(tempfile.mkdtemp(prefix="align-bench-ckpt-"))
    model = build_wide_model(work / "wide")
    data = subset(demo.demo_data("prompt_completion", "train"), 256, work / "d.jsonl")
    env = {**os.environ, "ALIGN_CACHE": str(work / "cache"), "TQDM_DISABLE": "1"}
    print(f"model: wide (8 layers, 512 wide, 27M parameters); {args.steps} SFT steps, batch 8")
    header = f"{'policy':6} {'s/checkpoint':>13} {'checkpoint MiB':>15} {'of which state/':>16}"
    header += f" {'run s':>7} {'resumed, last half s':>21}"
    print(header)
    print("-" * len(header))
    for policy in ("full", "lora"):
        common = ["--model", str(model), "--data", str(data), "--max-steps", str(args.steps)]
        common += ["--batch-size", "8", "--lr", "1e-4"] + (["--lora"] if policy == "lora" else [])
        plain = _align(*common, "--output-dir", str(work / f"{policy}-plain"), env=env)
        saving = _align(
            *common, "--save-every", "1", "--output-dir", str(work / f"{policy}-ckpt"), env=env
        )
        middle = args.steps // 2
        checkpoint = work / f"{policy}-ckpt" / "checkpoints" / f"step-{middle}"
        resumed_dir = work / f"{policy}-resumed"
        shutil.copytree(work / f"{policy}-ckpt", resumed_dir)
        shutil.rmtree(resumed_dir / "final")
        for extra in (resumed_dir / "checkpoints").iterdir():
            if extra.name != checkpoint.name:
                shutil.rmtree(extra)
        run_json = resumed_dir / "run.json"
        run_json.write_text(run_json.read_text().replace('"completed"', '"running"'))
        resumed = _align(
            *common, "--save-every", "1", "--output-dir", str(resumed_dir), "--resume", env=env
        )
        per_checkpoint = (saving - plain) / (args.steps - 1)
        print(
            f"{policy:6} {per_checkpoint:13.2f} {_size_mib(checkpoint):15.1f} "
            f"{_size_mib(checkpoint / 'state'):16.1f} {saving:7.1f} {resumed:21.1f}"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
