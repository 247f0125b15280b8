"""What ``--reward model:PATH`` costs on the demo: a reward model the demo model's size scoring
a demo round, and GRPO steps on the demo with and without it.

    python benchmarks/model_reward_cost.py                   # both parts, 3 interleaved repeats
    python benchmarks/model_reward_cost.py --steps 10 --repeats 2 --json out.json

The reward model is the demo's architecture (a 4-layer Llama, 128 wide, the demo tokenizer) as
``LlamaForSequenceClassification`` with one label, built from a config and saved (safetensors).

1. Scoring: load it as a run does (``ModelReward.load``: tokenizer and model, to the device),
   then score one round of the demo's on-policy settings, 64 prompts × 8 completions of up to
   16 tokens (the demo's sums answered, some wrongly, some rambling), at the default
   ``batch_size`` 32 and at 512 (the round in one pass); the median of 5 rounds after one
   warm-up.
2. Runs: ``align run --objective grpo --model demo`` for ``--steps`` steps at the demo's
   on-policy settings (64 prompts × 8 samples, completions ≤ 16 tokens; one evaluation, at
   the end, on the 200 held-out prompts × 8), rewarded by ``addition`` alone and by
   ``addition`` plus the reward model, interleaved ``--repeats`` times: the median wall times,
   their difference per step, and for each run with the model the seconds its scoring took
   (from ``train.log``: every call's timing, the end's evaluation included) and its load.

Every run is a fresh process with ``OMP_NUM_THREADS=1`` unless the environment sets it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def build_reward_model(directory: Path) -> Path:
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    from align import demo

    demo.build_demo_model(directory / "causal")
    config = AutoConfig.from_pretrained(directory / "causal")
    config.num_labels = 1
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    target = directory / "rm" / "final"
    model.save_pretrained(target, safe_serialization=True)
    demo.build_tokenizer().save_pretrained(target)
    return target


def demo_round() -> tuple[list, list]:
    """64 demo prompts × 8 completions: right, wrong and rambling answers."""
    from align import demo

    rows = [json.loads(x) for x in demo.demo_data("prompt_only", "train").read_text().splitlines()]
    prompts, completions = [], []
    for row in rows[:64]:
        question = row["prompt"][-1]["content"]
        a, b = (int(n) for n in question.removeprefix("What is ").rstrip("?").split(" + "))
        answers = [f"{a} + {b} = {a + b}.", f"It is {a + b + 1}.", f"{a} + {b} = {a} + {b} = "]
        for i in range(8):
            prompts.append(row["prompt"])
            completions.append([{"role": "assistant", "content": answers[i % 3]}])
    return prompts, completions


def scoring(path: Path, device: str) -> dict:
    import torch

    from align.rollout.model_reward import ModelReward, ModelRewardOptions

    target = SimpleNamespace(
        device=torch.device(device),
        autocast=contextlib.nullcontext,
    )
    reward = ModelReward(str(path), "rm")
    reward.load(SimpleNamespace(trust_remote_code=False), target)
    prompts, completions = demo_round()
    out = {"load_s": round(reward.load_seconds, 3), "completions": len(prompts)}
    for batch_size in (32, 512):
        options = ModelRewardOptions(batch_size=batch_size)
        reward(prompts, completions, options)  # warm-up
        times = []
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            reward(prompts, completions, options)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        out[f"round_s_batch_{batch_size}"] = round(statistics.median(times), 4)
    return out


def run(path: Path | None, steps: int, out: Path) -> dict:
    """One demo GRPO run (no evaluation, no checkpoints): its wall time and, with the reward
    model, the seconds its scoring took per step (train.log's timings of each call)."""
    rewards = ["--reward", "addition"] + (["--reward", f"model:{path}"] if path else [])
    command = [sys.executable, "-m", "align.cli", "run", "--objective", "grpo", "--model", "demo"]
    command += ["--max-steps", str(steps), "--output-dir", str(out), "--no-eval-on-start"]
    command += ["--eval-every", str(steps + 1), "--save-every", "0", *rewards]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - started
    log = (out / "train.log").read_text()
    scored = [float(s) for s in re.findall(r"completions scored in ([0-9.]+)s", log)]
    loaded = [float(s) for s in re.findall(r"loaded in ([0-9.]+)s", log)]
    # the last calls score the evaluation at the end: 200 held-out prompts
    return {"wall_s": wall, "scoring_s": sum(scored), "calls": len(scored), "load_s": loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-runs", action="store_true", help="Scoring only.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = build_reward_model(root)
        result: dict = {"device": device, "scoring": scoring(path, device)}
        print(json.dumps(result["scoring"]), flush=True)
        if not args.skip_runs:
            walls: dict[str, list[float]] = {"addition": [], "addition + model": []}
            for repeat in range(args.repeats):
                for label, rm in (("addition", None), ("addition + model", path)):
                    got = run(rm, args.steps, root / f"run-{repeat}-{rm is not None}")
                    walls[label].append(got["wall_s"])
                    print(f"{label}: {json.dumps(got)}", flush=True)
                    if rm is not None:
                        result.setdefault("model_runs", []).append(got)
            result["wall_s"] = {k: round(statistics.median(v), 2) for k, v in walls.items()}
            extra = result["wall_s"]["addition + model"] - result["wall_s"]["addition"]
            result["extra_wall_s_per_step"] = round(extra / args.steps, 3)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
