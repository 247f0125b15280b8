"""align against TRL: SFT, DPO and KTO on the same model, data, batch, precision and steps.

    pip install -r benchmarks/requirements.txt       # TRL: the benchmark's, never align's
    python benchmarks/against_trl.py                 # both workloads, table + JSON
    python benchmarks/against_trl.py --workloads tiny --objectives dpo --json out.json
    python benchmarks/against_trl.py --align-only --extra="--precision bf16"   # a lever alone

Workloads:

- ``tiny``: the demo model (a 4-layer Llama, 128 wide, vocabulary 430) on the whole demo train
  split (2000 records), one epoch, batch 8. What a user waits for: the whole process, from
  launch to exit (imports, tokenising, the reference, every step, the final save).
- ``realistic``: a 4-layer Llama, 256 wide, with a 32,000-token vocabulary and sequences up to
  512 tokens (prompts of 100-300 tokens, completions of 50-200), batch 4, a few steps: steady
  state, as examples (pairs) per second over the steps after the warm-up.

Every run is a fresh process with its own empty reference cache; the rows of one objective and
workload run interleaved (align, TRL, align, TRL, ...) ``--repeat`` times and report medians, so
a slow spell of the machine hits both. Both frameworks run with their
defaults (align: the precomputed reference; TRL: a reference model copy run every step) in
fp32 on the CPU, at the same learning rate and ``max_length``; TRL saves its final model as a
user would (``trainer.save_model``), logs every 10 steps, no checkpoints, no evaluation.
Figures per run: ``wall s`` (launch to exit), ``first step s`` (launch to the end of the first
step), ``s/step`` (median of the steps after the warm-up), ``ex/s`` (examples, or pairs, per
second over those steps), ``tok/s`` (non-padding tokens per second, from the tokens of the
examples each step trained on), ``peak MiB`` (peak RSS) and ``+MiB`` (peak RSS above the RSS
after importing torch and transformers, before the framework is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORKLOADS = {
    "tiny": {"batch": 8, "max_length": 64, "steps": None, "warmup": 5},
    "realistic": {"batch": 4, "max_length": 512, "steps": 8, "warmup": 2},
}
DATA_FORMATS = {"sft": "prompt_completion", "dpo": "preference", "kto": "feedback"}
LEARNING_RATE = "1e-5"


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the workloads' files ----------------------------------------------------------------------
def build_realistic_model(path: Path) -> Path:
    """The demo tokenizer and a Llama of realistic shape: vocabulary 32,000, 512 positions."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from align import demo

    tokenizer = demo.build_tokenizer()
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _text(rng: random.Random, tokens: int) -> str:
    # The demo tokenizer spends about one token per 2.5 characters of these words.
    words = ["What", "is", "the", "sum", "of", "and", "then", "add", "it", "to", "equals"]
    words += [str(n) for n in range(50)]
    out: list[str] = []
    while len(" ".join(out)) < tokens * 2.5:
        out.append(rng.choice(words))
    return " ".join(out)


def write_realistic_data(path: Path, data_format: str, records: int) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(records):
        prompt = [{"role": "user", "content": _text(rng, rng.randint(100, 300))}]

        def answer() -> list[dict[str, str]]:
            return [{"role": "assistant", "content": _text(rng, rng.randint(50, 200))}]

        if data_format == "preference":
            rows.append({"prompt": prompt, "chosen": answer(), "rejected": answer()})
        elif data_format == "feedback":
            rows.append({"prompt": prompt, "completion": answer(), "label": i % 2 == 0})
        else:
            rows.append({"messages": prompt + answer()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tokens_per_example(model: str, data: str, objective: str, max_length: int) -> float:
    """Mean non-padding tokens an example (a pair: both sequences) feeds the policy, as align
    tokenises it."""
    from transformers import AutoTokenizer

    from align.data.examples import tokenize_records
    from align.data.records import read_records
    from align.data.sharding import example_length

    tokenizer = AutoTokenizer.from_pretrained(model)
    examples, _ = tokenize_records(
        read_records(data), DATA_FORMATS[objective], tokenizer, max_length, "keep_start", "train"
    )
    return statistics.fmean(example_length(e) for e in examples)


# -- one run, in a child process ---------------------------------------------------------------
def run_align(args: argparse.Namespace, step_times: list[float]) -> None:
    import align
    from align import plugins
    from align.cli import cli

    class Clock:
        __name__ = "benchmark-clock"

        @align.hookimpl
        def align_metrics(self):
            step_times.append(time.time())
            return {}

    plugins.reset_registry(plugins.load_plugins(extra=[Clock()]))
    argv = ["run", "--objective", args.objective, "--model", args.model, "--data", args.data]
    argv += ["--batch-size", str(args.batch), "--max-length", str(args.max_length)]
    argv += ["--lr", LEARNING_RATE, "--output-dir", args.out, "--overwrite"]
    argv += ["--max-steps", str(args.steps)] if args.steps else []
    argv += shlex.split(args.extra)
    cli.main(argv, standalone_mode=False)


def run_trl(args: argparse.Namespace, step_times: list[float]) -> None:
    import datasets
    import trl
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_times.append(time.time())

    datasets.disable_progress_bars()
    data = datasets.load_dataset("json", data_files=args.data, split="train")
    common = {
        "output_dir": args.out,
        "per_device_train_batch_size": args.batch,
        "learning_rate": float(LEARNING_RATE),
        "max_length": args.max_length,
        "num_train_epochs": 1,
        "max_steps": args.steps or -1,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 42,
    }
    common.update(json.loads(args.trl_options or "{}"))
    config_class, trainer_class = {
        "sft": (trl.SFTConfig, trl.SFTTrainer),
        "dpo": (trl.DPOConfig, trl.DPOTrainer),
        "kto": (trl.KTOConfig, trl.KTOTrainer),
    }[args.objective]
    trainer = trainer_class(
        model=args.model,
        args=config_class(**common),
        train_dataset=data,
        callbacks=[Clock()],
    )
    trainer.train()
    trainer.save_model(str(Path(args.out) / "final"))


def child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401  (the baseline: what any trainer imports first)
    import transformers  # noqa: F401

    baseline = rss_mib()
    step_times: list[float] = []
    (run_align if args.framework == "align" else run_trl)(args, step_times)
    figures = {"step_times": step_times, "baseline_rss_mib": baseline, "peak": peak_rss_mib()}
    print("BENCH " + json.dumps(figures), flush=True)


# -- the log-prob computation alone ------------------------------------------------------------
LOGPROB_SHAPE = (8, 512, 32000)  # a realistic DPO micro-batch: 4 pairs, 512 tokens, 32k vocab


def logprob_child(method: str, dtype: str) -> None:
    """Forward and backward of the completion log-probs from given logits; peak RSS above the
    RSS with the logits (and their random targets and mask) allocated."""
    import torch

    from align.model.logprobs import token_logps

    torch.manual_seed(0)
    rows, length, vocab = LOGPROB_SHAPE
    logits = torch.randn(rows, length, vocab, dtype=getattr(torch, dtype)).requires_grad_()
    ids = torch.randint(0, vocab, (rows, length))
    mask = torch.zeros(rows, length, dtype=torch.long)
    mask[:, length // 2 :] = 1  # the second half of each sequence is its completion
    baseline = rss_mib()
    started = time.perf_counter()
    if method == "naive":
        logps = torch.log_softmax(logits.float()[:, :-1], -1)
        logps = logps.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    else:
        logps, _ = token_logps(logits, ids, mask)
    logps.sum().backward()
    seconds = time.perf_counter() - started
    print("BENCH " + json.dumps({"peak": peak_rss_mib() - baseline, "seconds": seconds}))


def measure_logprobs(dtype: str) -> dict:
    figures = {}
    for method in ("naive", "align"):
        command = [sys.executable, __file__, "--logprob-child", method, dtype]
        result = subprocess.run(command, capture_output=True, text=True)
        line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH ")), None)
        if result.returncode or line is None:
            raise RuntimeError(f"log-prob benchmark failed:\n{result.stderr[-3000:]}")
        figures[method] = json.loads(line[len("BENCH ") :])
    mib = LOGPROB_SHAPE[0] * LOGPROB_SHAPE[1] * LOGPROB_SHAPE[2] * 4 / 2**20
    print(
        f"log-probs of {'x'.join(map(str, LOGPROB_SHAPE))} {dtype} logits ({mib:.0f} MiB as "
        f"float32), forward + backward: peak above the logits {figures['naive']['peak']:.0f} "
        f"MiB naive (log_softmax, gather), {figures['align']['peak']:.0f} MiB align "
        f"({figures['align']['peak'] / figures['naive']['peak']:.2f}x); "
        f"{figures['naive']['seconds']:.2f}s vs {figures['align']['seconds']:.2f}s",
        flush=True,
    )
    return {"dtype": dtype, "shape": LOGPROB_SHAPE, **figures}


# -- the parent --------------------------------------------------------------------------------
def measure(
    framework: str,
    objective: str,
    workload: str,
    model: str,
    data: str,
    work: Path,
    tokens: float,
    extra: str = "",
    trl_options: str = "",
) -> dict:
    settings = WORKLOADS[workload]
    out = work / f"run-{framework}-{objective}"
    command = [sys.executable, __file__, "--child", framework, "--objective", objective]
    command += ["--model", model, "--data", data, "--out", str(out)]
    command += ["--batch", str(settings["batch"]), "--max-length", str(settings["max_length"])]
    command += ["--steps", str(settings["steps"] or 0), f"--extra={extra}"]
    command += [f"--trl-options={trl_options}"]
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    env = {**os.environ, "ALIGN_CACHE": str(cache), "TQDM_DISABLE": "1"}
    env["HF_DATASETS_CACHE"] = str(cache / "datasets")
    launched = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - launched
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH ")), None)
    if result.returncode or line is None:
        raise RuntimeError(f"{framework} {objective} {workload} failed:\n{result.stderr[-3000:]}")
    f = json.loads(line[len("BENCH ") :])
    times = f["step_times"]
    warm = settings["warmup"]
    durations = [b - a for a, b in zip(times[warm:], times[warm + 1 :], strict=False)]
    step_s = statistics.median(durations)
    examples_per_s = settings["batch"] / step_s
    return {
        "framework": framework,
        "objective": objective,
        "workload": workload,
        "options": extra or trl_options or "defaults",
        "steps": len(times),
        "wall_s": round(wall, 2),
        "first_step_s": round(times[0] - launched, 2),
        "s_per_step": round(step_s, 4),
        "examples_per_s": round(examples_per_s, 2),
        "tokens_per_s": round(examples_per_s * tokens, 1),
        "peak_rss_mib": round(f["peak"], 1),
        "peak_above_baseline_mib": round(f["peak"] - f["baseline_rss_mib"], 1),
    }


def medians(runs: list[dict]) -> dict:
    """One row from repeated runs of a configuration: the median of each figure."""
    row = dict(runs[0])
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = round(statistics.median(r[key] for r in runs), 4)
    row["repeats"] = len(runs)
    return row


def print_row(r: dict) -> None:
    print(
        f"{r['workload']:9} {r['objective']:4} {r['framework']:6} {r['options'][:28]:28} "
        f"{r['wall_s']:8.1f} {r['first_step_s']:10.1f} {r['s_per_step']:8.4f} "
        f"{r['examples_per_s']:8.1f} {r['tokens_per_s']:9.0f} {r['peak_rss_mib']:9.0f} "
        f"{r['peak_above_baseline_mib']:7.0f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="tiny,realistic")
    parser.add_argument("--objectives", default="sft,dpo,kto")
    parser.add_argument("--align-only", action="store_true", help="skip the TRL runs")
    parser.add_argument("--extra", default="", help="extra `align run` options for align's runs")
    parser.add_argument("--json", default="benchmark-against-trl.json", help="where to write")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; figures: medians")
    parser.add_argument("--logprobs-only", action="store_true", help="only the log-prob figures")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--logprob-child", nargs=2, help=argparse.SUPPRESS)
    for hidden in ("--objective", "--model", "--data", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trl-options", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.logprob_child:
        logprob_child(*args.logprob_child)
        return
    if args.child:
        args.framework = args.child
        child(args)
        return

    from align import demo

    work = Path(tempfile.mkdtemp(prefix="align-vs-trl-"))
    print(f"{os.cpu_count()} CPUs; work directory {work}\n")
    results: dict[str, Any] = {"logprobs": [measure_logprobs(d) for d in ("float32", "bfloat16")]}
    if args.logprobs_only:
        return
    header = f"{'workload':9} {'obj':4} {'frame':6} {'options':28} {'wall s':>8} "
    header += f"{'1st step s':>10} {'s/step':>8} {'ex/s':>8} {'tok/s':>9} {'peak MiB':>9} "
    header += f"{'+MiB':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    results["runs"] = []
    for workload in args.workloads.split(","):
        settings = WORKLOADS[workload]
        if workload == "tiny":
            model = str(demo.demo_model_path())
        else:
            model = str(build_realistic_model(work / "realistic-model"))
        for objective in args.objectives.split(","):
            fmt = DATA_FORMATS[objective]
            if workload == "tiny":
                data = str(demo.demo_data(fmt, "train"))
            else:
                records = settings["batch"] * settings["steps"]
                data = str(write_realistic_data(work / f"{fmt}.jsonl", fmt, records))
            tokens = tokens_per_example(model, data, objective, settings["max_length"])
            runs = [("align", args.extra, "")]
            if not args.align_only:
                runs.append(("trl", "", ""))
                if objective == "dpo":
                    runs.append(("trl", "", json.dumps({"precompute_ref_log_probs": True})))
            repeats: list[list[dict]] = [[] for _ in runs]
            for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits all
                for done, (framework, extra, trl_options) in zip(repeats, runs, strict=True):
                    done.append(
                        measure(
                            framework,
                            objective,
                            workload,
                            model,
                            data,
                            work,
                            tokens,
                            extra,
                            trl_options,
                        )  # fmt: skip
                    )
            for done in repeats:
                results["runs"].append(medians(done))
                print_row(results["runs"][-1])
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
