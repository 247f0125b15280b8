"""Does MinorSFT deviate less than SFT at the same learning rate? A demo-scale check.

    python benchmarks/minorsft_study.py                       # lr 1e-3, 3e-3, 1e-2; 250 steps
    python benchmarks/minorsft_study.py --lrs 3e-3 --steps 500

On the embedded demo (a 4-layer Llama learning addition from scratch), raw SFT, MinorSFT and IFT
train for the same steps at each learning rate, with the demo's other settings. For each run it
prints the held-out NLL (token mean over the eval split, computed here from the final model) and
the deviation m_θ = mean over eval sequences of (logπθ − logπ0)/m against the starting model
(``--eval-deviation``). The MinorSFT paper's claim is that MinorSFT deviates less at equal
learning rate, for a comparable or better NLL.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

OBJECTIVES = ["sft", "minorsft", "ift"]


def held_out_nll(model_dir: Path, eval_path: Path, max_length: int) -> float:
    """The token mean NLL of the eval split's answers, as ``align compare`` computes it."""
    from align.comparison.evaluate import EvalSet, EvalSettings, evaluate

    settings = EvalSettings(max_length, "keep_start", 1, "no", False)
    return evaluate(model_dir, [EvalSet("eval", str(eval_path))], [], settings, None)["eval"]["nll"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--steps", type=int, default=250)
    args = parser.parse_args()

    from align import demo
    from align.cli import cli
    from align.plugins import reset_registry

    work = Path(tempfile.mkdtemp(prefix="align-study-"))
    eval_path = demo.demo_data("prompt_completion", "eval")
    print(f"demo SFT data, {args.steps} steps per run, deviation against the starting model\n")
    print(f"{'lr':>7} {'objective':10} {'held-out NLL':>13} {'deviation m_θ':>14}")
    for lr in args.lrs.split(","):
        for objective in OBJECTIVES:
            out = work / f"{objective}-{lr}"
            reset_registry()
            argv = ["run", "--objective", objective, "--lr", lr, "--max-steps", str(args.steps)]
            argv += ["--eval-every", str(args.steps), "--eval-deviation", "--output-dir", str(out)]
            cli.main(argv, standalone_mode=False)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            deviation = [r["eval_deviation"] for r in rows if "eval_deviation" in r][-1]
            nll = held_out_nll(out / "final", eval_path, demo.DEMO_SETTINGS["max_length"])
            print(f"{lr:>7} {objective:10} {nll:13.3f} {deviation:14.3f}", flush=True)


if __name__ == "__main__":
    main()
