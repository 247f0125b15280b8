"""Benchmark DPO and KTO for each reference mode: seconds per step, tokens/s, peak RSS.

    python benchmarks/preference.py                   # the demo model, 256 examples, 20 steps
    python benchmarks/preference.py --wide --steps 8  # a 27M-parameter Llama, so a second
                                                      # model shows in memory

Every configuration runs in a fresh process (peak RSS is per process) with its own empty
reference cache, so ``precomputed`` pays its pass; ``precomputed (cached)`` is a second run that
finds the cache. ``setup s`` is the reference set-up (the pass, or copying/loading a model);
seconds per step and tokens per second are over the training steps after the first, from the
first to the last loss computation (no evaluation, no checkpoints). The LoRA rows train with
``--lora`` (align-plugin-lora: r=16, alpha=32, all linear projections), which ``adapter`` mode
needs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import align

CONFIGS = [
    ("full", "precomputed"),
    ("full", "precomputed (cached)"),
    ("full", "model"),
    ("lora", "precomputed"),
    ("lora", "model"),
    ("lora", "adapter"),
]


class StepClock:
    """An in-process plugin whose metrics hook records when each loss was computed."""

    __name__ = "benchmark-clock"

    def __init__(self) -> None:
        self.times: list[float] = []

    @align.hookimpl
    def align_metrics(self):
        self.times.append(time.perf_counter())
        return {}


def build_wide_model(path: Path) -> Path:
    """The demo model's tokenizer and architecture, 8 layers and 512 wide (about 27M parameters)."""
    from align import demo

    if not (path / "config.json").exists():
        demo.build_demo_model(path, hidden_size=512, layers=8)
    return path


def run_one(args: argparse.Namespace) -> None:
    """Child process: one training run, then its figures as one JSON line on stdout."""
    from align import plugins
    from align.cli import cli

    clock = StepClock()
    plugins.reset_registry(plugins.load_plugins(extra=[clock]))
    mode = args.mode.split()[0]
    lr = "1e-4" if args.policy == "lora" else "1e-5"
    argv = ["run", "--objective", args.objective, "--model", args.model, "--data", args.data]
    argv += ["--reference", mode, "--max-steps", str(args.steps), "--lr", lr]
    argv += ["--batch-size", str(args.batch_size), "--max-length", "64", "--overwrite"]
    argv += ["--output-dir", args.out] + (["--lora"] if args.policy == "lora" else [])
    cli.main(argv, standalone_mode=False)
    rows = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((Path(args.out) / "run.json").read_text())["reference"]
    seconds = clock.times[-1] - clock.times[0]
    tokens = rows[-2]["num_tokens"] - rows[0]["num_tokens"]  # steps 2..N-1, as timed
    figures = {
        "setup_s": info["setup_seconds"],
        "cache_hit": all(s["cache_hit"] for s in info.get("splits", {}).values()) or None,
        "s_per_step": seconds / (len(clock.times) - 1),
        "tokens_per_s": tokens / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("BENCH " + json.dumps(figures), flush=True)


def subset(source: Path, n: int, target: Path) -> Path:
    lines = source.read_text(encoding="utf-8").splitlines()[:n]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--wide", action="store_true", help="a 27M-parameter model")
    parser.add_argument("--objectives", default="dpo,kto")
    parser.add_argument("--one", nargs=3, metavar=("OBJECTIVE", "POLICY", "MODE"))
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.objective, args.policy, args.mode = args.one
        run_one(args)
        return

    from align import demo

    work = Path(tempfile.mkdtemp(prefix="align-bench-"))
    model = build_wide_model(work / "wide") if args.wide else demo.demo_model_path()
    print(
        f"model: {'wide (8 layers, 512 wide)' if args.wide else 'demo'}; {args.examples} "
        f"examples; batch {args.batch_size}; {args.steps} steps; {os.cpu_count()} CPUs\n"
    )
    header = f"{'objective':9} {'policy':6} {'reference':21} {'setup s':>8} {'s/step':>8} "
    header += f"{'tokens/s':>9} {'peak RSS MiB':>13}"
    print(header)
    print("-" * len(header))
    for objective in args.objectives.split(","):
        fmt = "preference" if objective == "dpo" else "feedback"
        data = subset(demo.demo_data(fmt, "train"), args.examples, work / f"{fmt}.jsonl")
        for policy, mode in CONFIGS:
            cache = work / f"cache-{objective}-{policy}"
            env = {**os.environ, "ALIGN_CACHE": str(cache), "TQDM_DISABLE": "1"}
            command = [sys.executable, __file__, "--one", objective, policy, mode]
            command += ["--model", str(model), "--data", str(data), "--out", str(work / "run")]
            command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH ")), None)
            if result.returncode or line is None:
                print(f"{objective:9} {policy:6} {mode:21} failed:\n{result.stderr[-2000:]}")
                continue
            f = json.loads(line[len("BENCH ") :])
            print(
                f"{objective:9} {policy:6} {mode:21} {f['setup_s']:8.2f} {f['s_per_step']:8.3f} "
                f"{f['tokens_per_s']:9.0f} {f['peak_rss_mib']:13.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
