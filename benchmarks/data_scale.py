"""Data at scale: align against TRL 1.16 on 10k, 100k and 1M synthetic conversations (and 100k
preference pairs): time to the end of step 1 on a first and a second run, tokenised records per
second, and peak RSS and RssAnon (memory that is not a mapped file) per process, with 1 and 2
training processes.

    python benchmarks/data_scale.py                       # 10k and 100k, both frameworks
    python benchmarks/data_scale.py --sizes 1000000 --skip-trl
    python benchmarks/data_scale.py --sizes 10000 --processes 2

Every run is a whole process, as a user starts it (`align run … --max-steps 1`, or a script
that builds TRL's trainer and trains one step), timed to its exit, with a sampler reading
/proc/<pid>/status of the process and its children every 50 ms. "first" runs start from an
empty cache (ALIGN_CACHE, HF_DATASETS_CACHE), "second" runs reuse it. Both tokenise with the
same number of worker processes (align's --data-workers, TRL's dataset_num_proc). Each
training process gets one thread (OMP_NUM_THREADS=1): the figures are about data, not matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = " ".join(
    [
        "the of and to in is that for it as with was on be by at this which from or have an",
        "are not but had his they you were her she there been one all we their has would when",
        "if so no what out up said who about more into them some could him time only my two",
    ]
).split()

TRL_SCRIPT = r"""
import json, sys, time
started = time.time()
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
kind, model, data, out, workers = sys.argv[1:6]
tokenizer = AutoTokenizer.from_pretrained(model)
dataset = load_dataset("json", data_files=data, split="train")
common = dict(output_dir=out, max_steps=1, per_device_train_batch_size=8, report_to=[],
              save_strategy="no", dataset_num_proc=int(workers), logging_steps=1,
              use_cpu=True, max_length=512)
built = time.time()
if kind == "sft":
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model),
                         args=SFTConfig(**common), train_dataset=dataset,
                         processing_class=tokenizer)
else:
    from trl import DPOConfig, DPOTrainer
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model),
                         args=DPOConfig(**common), train_dataset=dataset,
                         processing_class=tokenizer)
prepared = time.time()
trainer.train()
print("BENCH " + json.dumps({"prepare_seconds": prepared - built, "records": len(dataset)}))
"""


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def write_conversations(path: Path, count: int, seed: int = 0) -> None:
    """Three exchanges each, about 350 tokens with the demo tokenizer."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            messages = []
            for _ in range(3):
                messages.append({"role": "user", "content": sentence(rng, 6, 12)})
                messages.append({"role": "assistant", "content": sentence(rng, 12, 23)})
            handle.write(json.dumps({"messages": messages}) + "\n")


def write_pairs(path: Path, count: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            row = {
                "prompt": sentence(rng, 8, 20),
                "chosen": sentence(rng, 10, 30),
                "rejected": sentence(rng, 10, 30),
            }
            handle.write(json.dumps(row) + "\n")


class Sampler:
    """Peak RSS and RssAnon of every process in a tree, read from /proc every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peaks, self.names, self.parents = pid, {}, {}, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _tree(self) -> list[int]:
        pids, frontier = [self.pid], [self.pid]
        while frontier:
            pid = frontier.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                pids.append(child)
                frontier.append(child)
        return pids

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid in self._tree():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                fields = dict(re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", status, re.M))
                if not fields:
                    continue
                rss, anon = int(fields.get("VmRSS", 0)), int(fields.get("RssAnon", 0))
                old = self.peaks.get(pid, (0, 0))
                self.peaks[pid] = (max(old[0], rss), max(old[1], anon))
                self.names[pid] = cmd.decode(errors="replace")[:400]
                self.parents[pid] = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
            time.sleep(0.05)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        return self.peaks


def run(command: list[str], env: dict[str, str]) -> dict:
    """Run a whole process; its time to exit, output, and per-process memory peaks (MiB)."""
    started = time.time()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sampler = Sampler(process.pid)
    output, _ = process.communicate()
    seconds = time.time() - started
    peaks = sampler.finish()
    if process.returncode != 0:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"failed: {' '.join(command)}")
    # A forked worker (align's tokenisers, datasets' map processes) has its parent's command
    # line; every other process of the tree is a training process or its launcher.
    names, parents = sampler.names, sampler.parents
    workers = [p for p in peaks if names.get(parents.get(p)) == names.get(p)]
    trainers = [p for p in peaks if p not in workers]

    def mib(pids: list[int], index: int) -> float:
        return max((peaks[p][index] for p in pids if p in peaks), default=0) / 1024

    return {
        "seconds": seconds,
        "output": output,
        "trainers": len(trainers),
        "peak_rss": mib(trainers, 0),
        "peak_anon": mib(trainers, 1),
        "worker_peak_anon": mib(workers, 1),
    }


def align_run(
    model: Path, data: Path, cache: Path, workers: int, processes: int, objective: str
) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-run-"))
    shutil.rmtree(out)
    command = [
        sys.executable, "-m", "align.cli", "run", "--objective", objective,
        "--model", str(model), "--data", str(data), "--max-steps", "1", "--batch-size", "8",
        "--max-length", "512", "--data-workers", str(workers), "--output-dir", str(out),
    ]  # fmt: skip
    if objective == "dpo":
        command += ["--reference", "model"]  # as TRL's default: no precomputing pass
    if processes > 1:
        command += ["--num-processes", str(processes)]
    env = {**os.environ, "ALIGN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env["ACCELERATE_USE_CPU"] = "true"
    result = run(command, env)
    shutil.rmtree(out, ignore_errors=True)
    match = re.search(r"tokenised in ([\d.]+)s", result["output"])
    result["tokenise_seconds"] = float(match.group(1)) if match else None
    return result


def trl_run(
    model: Path, data: Path, cache: Path, workers: int, processes: int, objective: str
) -> dict:
    out = tempfile.mkdtemp(prefix="bench-trl-")
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env["HF_DATASETS_OFFLINE"] = env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-c", TRL_SCRIPT]
    if processes > 1:  # torchrun's workers, data-parallel over gloo as align's are
        script = Path(out) / "trl_step.py"
        script.write_text(TRL_SCRIPT)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(processes), str(script)]
    command += [objective, str(model), str(data), out]
    result = run([*command, str(workers)], env)
    shutil.rmtree(out, ignore_errors=True)
    line = next(ln for ln in result["output"].splitlines() if ln.startswith("BENCH "))
    result["tokenise_seconds"] = json.loads(line[6:])["prepare_seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="conversation counts")
    parser.add_argument("--pairs", type=int, default=100000, help="preference pairs (0: none)")
    parser.add_argument("--workers", type=int, default=2, help="tokenising processes")
    parser.add_argument("--processes", default="1", help="training processes to measure: 1,2")
    parser.add_argument("--skip-trl", action="store_true", help="align's rows only")
    parser.add_argument("--skip-align", action="store_true", help="TRL's rows only")
    parser.add_argument("--dir", default=None, help="where data and caches go (default: temp)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="align-data-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    from align import demo

    model = root / "model"
    if not (model / "config.json").exists():
        demo.build_demo_model(model)
    cases = [("sft", int(n)) for n in args.sizes.split(",") if n.strip() and int(n)]
    if args.pairs:
        cases.append(("dpo", args.pairs))
    frameworks = [("align", align_run)] * (not args.skip_align)
    frameworks += [("TRL 1.16", trl_run)] * (not args.skip_trl)
    rows = []
    for objective, count in cases:
        data = root / f"{objective}-{count}.jsonl"
        if not data.exists():
            (write_conversations if objective == "sft" else write_pairs)(data, count)
        for name, runner in frameworks:
            for processes in [int(p) for p in args.processes.split(",")]:
                cache = root / f"{name.split()[0]}-cache-{objective}-{count}-{processes}"
                shutil.rmtree(cache, ignore_errors=True)
                first = runner(model, data, cache, args.workers, processes, objective)
                second = runner(model, data, cache, args.workers, processes, objective)
                rows.append((name, objective, count, processes, first, second))
                _print_row(rows[-1])
                shutil.rmtree(cache, ignore_errors=True)
    print()
    print(
        "| framework | objective | records | processes | first run to step 1 | second run "
        "| records/s tokenised | peak RSS / process | peak RssAnon / process |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(_markdown(row))


def _rate(count: int, result: dict) -> str:
    seconds = result["tokenise_seconds"]
    return f"{count / seconds:,.0f}" if seconds else "n/a"


def _markdown(row: tuple) -> str:
    name, objective, count, processes, first, second = row
    return (
        f"| {name} | {objective} | {count:,} | {processes} | {first['seconds']:.1f} s "
        f"| {second['seconds']:.1f} s | {_rate(count, first)} | {first['peak_rss']:,.0f} MiB "
        f"| {first['peak_anon']:,.0f} MiB |"
    )


def _print_row(row: tuple) -> None:
    print(_markdown(row), flush=True)
    first, second = row[4], row[5]
    print(
        f"    second run: peak RSS {second['peak_rss']:,.0f} MiB, RssAnon "
        f"{second['peak_anon']:,.0f} MiB; tokenising workers' peak RssAnon "
        f"{first['worker_peak_anon']:,.0f} MiB; training processes seen: {first['trainers']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
