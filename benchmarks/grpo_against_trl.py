"""align against TRL: GRPO steps per second on the same model, prompts, sampling and steps.

    pip install -r benchmarks/requirements.txt       # TRL: the benchmark's, never align's
    python benchmarks/grpo_against_trl.py            # both workloads, 3 interleaved repeats
    python benchmarks/grpo_against_trl.py --workloads tiny --repeats 3 --steps 20 --json out.json
    python benchmarks/grpo_against_trl.py --extra="--no-padding-free"   # an align lever alone
    python benchmarks/grpo_against_trl.py --generators transformers      # one align row only

align runs ``align run --objective grpo`` (plugins/grpo); TRL runs 1.16's ``GRPOTrainer`` on its
``model.generate`` path (no vLLM). Both sides get the same:

- model: ``tiny``, the demo model (a 4-layer Llama, 128 wide, vocabulary 430); ``wide``, the same
  tokenizer with a 6-layer, 512-wide Llama (``align.demo.build_demo_model``), so the figure is
  not only per-step overheads;
- prompts: the demo's prompt-only sums (``{"prompt": [messages], "answer": int}``), rewarded by
  align's ``--reward addition`` and, for TRL, a reward function with the same rule (the
  completion's last number equals ``answer``: 1.0, else 0.0);
- sampling: G = 8 completions per prompt (TRL's default ``num_generations``), temperature 1,
  top-p 1, ``max_completion_length`` 32 (tiny) or 64 (wide). An untrained model rarely samples
  EOS, so almost every completion runs to the limit on both sides; the table shows the mean
  completion length each side logged (a side whose completions are longer does more work);
- batch: 2 prompts, 16 completions per step. align's ``--batch-size`` counts prompts, TRL's
  ``per_device_train_batch_size`` counts completions: align ``--batch-size 2`` is TRL's 16.
  No gradient accumulation; one round of sampling per step (``num_iterations`` 1); 40 steps
  (tiny) or 10 (wide);
- loss: ``beta`` 0 (no reference model on either side), ``loss_type`` dapo, the same learning
  rate (1e-5), AdamW, linear decay, no warm-up, gradient clipping at 1 (both defaults);
- fp32 on the CPU (align's default precision ``no``; TRL ``bf16=False``, ``use_cpu=True``), no
  evaluation, no checkpoints, a final save on both sides (TRL: ``trainer.save_model``), one
  metrics row per step on both sides (TRL ``logging_steps=1``: align logs every step, and the
  per-step completion lengths come from those rows).

Two align rows, one per generation backend (``--generators``): ``align``, the default
``transformers`` backend (``model.generate``), and ``align --generator kv-loop``, the lean
decoding loop that samples what ``model.generate`` samples. Two TRL rows: its defaults (which
include ``gradient_checkpointing=True``: the backward runs each layer's forward again) and
``gradient_checkpointing=False``, the same work as align. ``× TRL dflt/no-gc`` is an align
row's steps/s over each TRL row's.

Every run is a fresh process with ``OMP_NUM_THREADS=1`` (the machine is shared: see the README)
and its own empty cache; the runs of one workload are interleaved (align, TRL, TRL, align, ...)
``--repeats`` times and the table shows medians, so a slow spell hits every row. ``s/step`` is
the median time between consecutive steps from the third step on (the first two are warm-up;
sampling included: a GRPO step is a round of generation, rewards, the loss's forward and
backward and the update), ``steps/s`` its inverse; ``wall s`` is launch to exit; ``compl/s`` is
completions trained on per second; ``peak MiB`` is peak RSS. Before each run the parent waits
while other heavy jobs (``align run``, ``pytest``) run, ``--wait`` seconds in all, and the JSON
records ``/proc/loadavg`` before, at each launch and after, and the jobs still running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from against_trl import medians, peak_rss_mib, rss_mib  # noqa: E402  (the SFT/DPO/KTO bench)

NUM_GENERATIONS = 8
LEARNING_RATE = "1e-5"
WORKLOADS: dict[str, dict[str, Any]] = {
    # model: None is the demo model; (hidden_size, layers) a wider demo Llama
    "tiny": {"model": None, "prompts": 2, "completion": 32, "steps": 40},
    "wide": {"model": (512, 6), "prompts": 2, "completion": 64, "steps": 10},
}
WARMUP = 1  # step-end intervals left out of s/step, after the first step's (the warm-up)
BUSY = "align run|pytest"  # other jobs that would distort the figures
PER_RUN = (
    "step_durations",
    "loadavg_at_launch",
    "busy_at_launch",
)  # in the JSON's repeats, not the medians


# -- the workloads' files ----------------------------------------------------------------------
def workload_model(name: str, work: Path) -> str:
    from align import demo

    shape = WORKLOADS[name]["model"]
    if shape is None:
        return str(demo.demo_model_path())
    path = work / f"model-{shape[0]}x{shape[1]}"
    if not (path / "config.json").exists():
        from transformers.utils import logging

        logging.disable_progress_bar()
        demo.build_demo_model(path, hidden_size=shape[0], layers=shape[1])
    return str(path)


# -- one run, in a child process ---------------------------------------------------------------
def run_align(args: argparse.Namespace, step_times: list[float]) -> dict:
    import align
    from align import plugins
    from align.cli import cli

    class Clock:
        __name__ = "benchmark-clock"

        @align.hookimpl
        def align_metrics(self):  # once per micro-batch: one per step here
            step_times.append(time.time())
            return {}

    plugins.reset_registry(plugins.load_plugins(extra=[Clock()]))
    argv = ["run", "--objective", "grpo", "--model", args.model, "--data", args.data]
    argv += ["--batch-size", str(args.prompts), "--grad-accum", "1", "--lr", LEARNING_RATE]
    argv += ["--max-steps", str(args.steps), "--max-completion-length", str(args.completion)]
    argv += ["--temperature", "1.0", "--top-p", "1.0", "--reward", "addition"]
    argv += ["--set", f"num_generations={NUM_GENERATIONS}", "--set", "beta=0.0"]
    argv += ["--set", "loss_type=dapo", "--set", "num_iterations=1"]
    argv += ["--output-dir", args.out, "--overwrite"] + shlex.split(args.extra)
    cli.main(argv, standalone_mode=False)
    rows = [
        json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()
    ]
    lengths = [r["completions/mean_length"] for r in rows if "completions/mean_length" in r]
    rewards = [r["reward"] for r in rows if "reward" in r]
    return {"lengths": lengths, "rewards": rewards}


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def addition_reward(completions: list, answer: list, **_: Any) -> list[float]:
    """align's ``addition`` for TRL: 1.0 when the completion's last number equals ``answer``."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = (
            completion
            if isinstance(completion, str)
            else "".join(str(m.get("content", "")) for m in completion)
        )
        numbers = _NUMBER.findall(text)
        rewards.append(float(bool(numbers) and float(numbers[-1]) == float(expected)))
    return rewards


def run_trl(args: argparse.Namespace, step_times: list[float]) -> dict:
    import datasets
    import trl
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_times.append(time.time())

    datasets.disable_progress_bars()
    data = datasets.load_dataset("json", data_files=args.data, split="train")
    options = {
        "output_dir": args.out,
        "per_device_train_batch_size": args.prompts * NUM_GENERATIONS,  # completions
        "gradient_accumulation_steps": 1,
        "num_generations": NUM_GENERATIONS,
        "max_completion_length": args.completion,
        "temperature": 1.0,
        "top_p": 1.0,
        "beta": 0.0,
        "loss_type": "dapo",
        "num_iterations": 1,
        "learning_rate": float(LEARNING_RATE),
        "max_steps": args.steps,
        "bf16": False,
        "use_cpu": True,
        "use_vllm": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 42,
    }
    options.update(json.loads(args.trl_options or "{}"))
    trainer = trl.GRPOTrainer(
        model=args.model,
        reward_funcs=addition_reward,
        args=trl.GRPOConfig(**options),
        train_dataset=data,
        callbacks=[Clock()],
    )
    assert not trainer.use_vllm and not trainer.use_transformers_continuous_batching
    trainer.train()
    trainer.save_model(str(Path(args.out) / "final"))
    history = trainer.state.log_history
    lengths = [r["completions/mean_length"] for r in history if "completions/mean_length" in r]
    rewards = [r["reward"] for r in history if "reward" in r]
    return {"lengths": lengths, "rewards": rewards}


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers  # noqa: F401

    baseline = rss_mib()
    step_times: list[float] = []
    logged = (run_align if args.framework == "align" else run_trl)(args, step_times)
    figures = {
        "step_times": step_times,
        "baseline_rss_mib": baseline,
        "peak": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        **logged,
    }
    print("BENCH " + json.dumps(figures), flush=True)


# -- the parent --------------------------------------------------------------------------------
def busy_jobs() -> list[str]:
    """Other heavy jobs running now (their wrappers, such as ``timeout``, left out)."""
    result = subprocess.run(["pgrep", "-fa", BUSY], capture_output=True, text=True)
    jobs = [line.split(" ", 1) for line in result.stdout.splitlines()]
    return [
        f"{pid} {cmd}"
        for pid, cmd in jobs
        if pid != str(os.getpid()) and cmd.split(" ", 1)[0] not in ("timeout", "nohup")
    ]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


class Quiet:
    """Waits, before each run, while other heavy jobs run: ``budget_s`` seconds in all."""

    def __init__(self, budget_s: float, poll_s: float = 30.0) -> None:
        self.left, self.poll, self.waited = budget_s, poll_s, 0.0

    def wait(self) -> list[str]:
        """The jobs still running when the wait ends (none, or the budget is spent)."""
        jobs = busy_jobs()
        while jobs and self.left > 0:
            print(f"waiting: {len(jobs)} other job(s) running ({loadavg()})", flush=True)
            pause = min(self.poll, self.left)
            time.sleep(pause)
            self.left -= pause
            self.waited += pause
            jobs = busy_jobs()
        return jobs


def measure(
    framework: str, workload: str, model: str, data: str, work: Path, args: argparse.Namespace,
    label: str, quiet: Quiet, extra: str = "", trl_options: str = "",
) -> dict:  # fmt: skip
    settings = WORKLOADS[workload]
    steps = args.steps or settings["steps"]
    prompts = args.prompts or settings["prompts"]
    completion = args.completion or settings["completion"]
    out = work / f"run-{framework}-{workload}"
    command = [sys.executable, __file__, "--child", framework, "--model", model, "--data", data]
    command += ["--out", str(out), "--prompts", str(prompts), "--completion", str(completion)]
    command += ["--steps", str(steps), f"--extra={extra}", f"--trl-options={trl_options}"]
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    env = {**os.environ, "ALIGN_CACHE": str(cache), "TQDM_DISABLE": "1"}
    env.update(HF_DATASETS_CACHE=str(cache / "datasets"), OMP_NUM_THREADS=str(args.threads))
    env.update(MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    busy = quiet.wait()
    load = loadavg()
    launched = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - launched
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH ")), None)
    if result.returncode or line is None:
        raise RuntimeError(f"{label} {workload} failed:\n{result.stderr[-4000:]}")
    f = json.loads(line[len("BENCH ") :])
    times = f["step_times"]
    if len(times) != steps:
        raise RuntimeError(f"{label} {workload}: {len(times)} step times for {steps} steps")
    durations = [b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1 :], strict=False)]
    step_s = statistics.median(durations)
    completions = prompts * NUM_GENERATIONS
    return {
        "workload": workload,
        "framework": framework,
        "trainer": label,
        "options": extra or trl_options or "defaults",
        "steps": len(times),
        "prompts_per_step": prompts,
        "completions_per_step": completions,
        "max_completion_length": completion,
        "threads": f["threads"],
        "wall_s": round(wall, 2),
        "first_step_s": round(times[0] - launched, 2),
        "s_per_step": round(step_s, 4),
        "mean_s_per_step": round(statistics.fmean(durations), 4),
        "steps_per_s": round(1 / step_s, 4),
        "completions_per_s": round(completions / step_s, 2),
        "mean_completion_length": round(statistics.fmean(f["lengths"]), 2),
        "mean_reward": round(statistics.fmean(f["rewards"]), 4),
        "peak_rss_mib": round(f["peak"], 1),
        "peak_above_baseline_mib": round(f["peak"] - f["baseline_rss_mib"], 1),
        "loadavg_at_launch": load,
        "busy_at_launch": busy,
        "step_durations": [round(d, 4) for d in durations],
    }


HEADER = (
    f"| {'workload':8} | {'trainer':34} | {'wall s':>7} | {'1st step s':>10} | {'s/step':>7} | "
    f"{'steps/s':>7} | {'compl/s':>7} | {'mean len':>8} | {'peak MiB':>8} | "
    f"{'× TRL dflt/no-gc':>16} |"
)


def table_row(r: dict) -> str:
    ratio = " / ".join(f"{x:.2f}" for x in r.get("over_trl", {}).values())
    return (
        f"| {r['workload']:8} | {r['trainer'][:34]:34} | {r['wall_s']:7.1f} | "
        f"{r['first_step_s']:10.1f} | {r['s_per_step']:7.3f} | {r['steps_per_s']:7.2f} | "
        f"{r['completions_per_s']:7.1f} | {r['mean_completion_length']:8.1f} | "
        f"{r['peak_rss_mib']:8.0f} | {ratio:>16} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="tiny,wide", help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; figures: medians")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: workload's)")
    parser.add_argument("--prompts", type=int, help="prompts per step (× 8 completions)")
    parser.add_argument("--completion", type=int, help="max_completion_length")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--extra", default="", help="extra `align run` options for align's runs")
    parser.add_argument("--align-only", action="store_true", help="skip the TRL runs")
    parser.add_argument(
        "--generators",
        default="transformers,kv-loop",
        help="align rows: one per generation backend (--generator NAME; comma list)",
    )
    parser.add_argument(
        "--trl-rows", default="defaults,no-gc", help="TRL rows: defaults, no-gc (comma list)"
    )
    parser.add_argument(
        "--wait", type=float, default=900, help="s to wait, in all, for other jobs to end"
    )
    parser.add_argument("--json", default="benchmark-grpo-against-trl.json", help="where to write")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--model", "--data", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--trl-options", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.framework = args.child
        child(args)
        return

    import torch
    import transformers
    import trl

    from align import demo

    work = Path(tempfile.mkdtemp(prefix="align-vs-trl-grpo-"))
    data = str(demo.demo_data("prompt_only", "train"))
    print(f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={args.threads}; work directory {work}")
    quiet = Quiet(args.wait)
    busy_before = quiet.wait()
    load_before = loadavg()
    print(f"load before: {load_before}\n", flush=True)
    runs: list[tuple[str, str, str, str]] = [
        ("align", "align", args.extra, "")
        if name == "transformers"  # the default: the command line as a user types it
        else ("align", f"align --generator {name}", f"{args.extra} --generator {name}".strip(), "")
        for name in args.generators.split(",")
        if name
    ]
    trl_rows = {
        "defaults": ("trl", "TRL (defaults: grad. checkpointing)", "", ""),
        "no-gc": (
            "trl",
            "TRL gradient_checkpointing=False",
            "",
            '{"gradient_checkpointing": false}',
        ),
    }
    if not args.align_only:
        runs += [trl_rows[name] for name in args.trl_rows.split(",") if name]
    results: dict[str, Any] = {
        "setup": {
            "num_generations": NUM_GENERATIONS,
            "learning_rate": float(LEARNING_RATE),
            "workloads": WORKLOADS,
            "overrides": {
                "steps": args.steps,
                "prompts": args.prompts,
                "completion": args.completion,
            },
            "warmup_intervals_dropped": WARMUP,
            "threads": args.threads,
            "repeats": args.repeats,
            "align_extra": args.extra,
            "align_generators": args.generators,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "busy_when_timing_started": busy_before,
            "loadavg_before": load_before,
        },
        "runs": [],
        "repeats": [],
    }
    print(HEADER + "\n|" + "|".join("-" * len(c) for c in HEADER.split("|")[1:-1]) + "|")
    for workload in args.workloads.split(","):
        model = workload_model(workload, work)
        repeats: list[list[dict]] = [[] for _ in runs]
        for i in range(args.repeats):  # interleaved, alternating the order, so a slow spell
            order = list(zip(repeats, runs, strict=True))  # hits every row
            for done, (framework, label, extra, trl_options) in order[:: 1 if i % 2 == 0 else -1]:
                r = measure(
                    framework, workload, model, data, work, args, label, quiet, extra, trl_options
                )  # fmt: skip
                done.append(r)
                results["repeats"].append(r)
                print(
                    f"  [{workload} {i + 1}/{args.repeats}] {label}: {r['s_per_step']:.3f} s/step, "
                    f"wall {r['wall_s']:.1f} s, mean len {r['mean_completion_length']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
        rows = [medians([{k: v for k, v in r.items() if k not in PER_RUN} for r in d])
                for d in repeats]  # fmt: skip
        trl = [row for row in rows if row["framework"] == "trl"]
        for row in rows:
            if row["framework"] == "align":
                row["over_trl"] = {
                    t["trainer"]: round(row["steps_per_s"] / t["steps_per_s"], 3) for t in trl
                }
        for row in rows:
            results["runs"].append(row)
            print(table_row(row), flush=True)
    results["machine"]["loadavg_after"] = loadavg()
    results["machine"]["busy_after"] = busy_jobs()
    results["machine"]["waited_s"] = quiet.waited
    results["machine"]["runs_launched_while_busy"] = sum(
        bool(r["busy_at_launch"]) for r in results["repeats"]
    )
    print(f"\nload before: {load_before}; after: {results['machine']['loadavg_after']}")
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
