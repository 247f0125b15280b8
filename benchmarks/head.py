"""The output head alone: log-probs of the trained tokens, forward and backward, two ways.

    python benchmarks/head.py                          # Qwen2.5-0.5B's head, bf16 and fp32
    python benchmarks/head.py --trained-fraction 0.5   # DPO-like: the prompt half untrained
    python benchmarks/head.py --dtypes bf16 --repeat 3 --json head.json

One micro-batch of ``--rows`` × ``--length`` positions (8 × 2048) of hidden states, ``--hidden``
wide (896), through an ``nn.Linear(896, 151936, bias=False)`` output head (Qwen2.5-0.5B's),
the last ``--trained-fraction`` of each row's positions trained (all by default), a random
gradient per trained position. Two ways to get ``log p(target)`` and its gradients:

- ``today``: the full logits ``F.linear(hidden, weight)`` ``[rows, length, vocabulary]`` (under
  autocast: bf16), then ``align.model.logprobs.target_logps`` (chunked float32 log-probs at the
  trained positions) and ``(logps * g).sum().backward()``;
- ``hidden``: ``align.model.head.hidden_target_logps(hidden[mask], targets[mask], head)``: only
  the trained rows, through the head a chunk at a time, no full-vocabulary logits; its backward
  recomputes each chunk's logits.

``bf16`` runs both under CPU autocast (float32 weights, as a bf16 run of ``align run`` does),
``fp32`` without. The fp32 ``today`` path needs two float32 copies of the logits (the logits and
their gradient: 20 GB at 8 × 2048 × 151,936), more than a 24 GiB machine can spare, so fp32 runs
``--fp32-rows`` rows (4) instead; both methods run at that size, so the ratios hold. Any run the
machine's available memory cannot hold (estimated before it starts) is skipped with a message.

Each measurement is a fresh process: the inputs (hidden states, head, targets, mask, gradient)
are allocated first, its peak RSS (``VmHWM``) is reset to the RSS then, and ``+MiB`` is the peak
above it during forward and backward (so it includes the head's weight gradient, 545 MiB, on
both sides); ``s`` is the wall time of forward and backward. The methods run interleaved
(today, hidden, today, hidden, ...) ``--repeat`` times; the table shows medians and the ratios
hidden/today. Before any timing a small case (2 × 512 positions at the full vocabulary: several
of ``hidden``'s chunks) checks that both give the same log-probs and the same gradients of the
hidden states and the weight (fp32 tightly, bf16 loosely).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from against_trl import available_mib, memory_guard, rss_mib  # noqa: E402

METHODS = ("today", "hidden")
CHECK_SHAPE = (2, 512)  # rows × positions of the agreement check
TOLERANCES = {"fp32": (1e-4, 1e-4), "bf16": (2e-2, 3e-2)}  # logps abs, gradients' rel. norm


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def inputs(args: argparse.Namespace, rows: int, length: int):
    """The head, hidden states, targets, trained mask and per-position gradient, seeded."""
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(rows, length, args.hidden).requires_grad_()
    targets = torch.randint(0, args.vocab, (rows, length))
    mask = torch.zeros(rows, length, dtype=torch.bool)
    mask[:, length - round(length * args.trained_fraction) :] = True  # the answer: the end
    g = torch.randn(rows, length)
    return head, hidden, targets, mask, g


def compute(method: str, dtype: str, head, hidden, targets, mask, g):
    """Forward and backward of one method; returns the log-probs at the trained positions."""
    import torch

    from align.model.logprobs import target_logps

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    if method == "today":
        with autocast:
            logits = torch.nn.functional.linear(hidden, head.weight)
        logps = target_logps(logits, targets, mask)
        (logps * g).sum().backward()
        return logps[mask]
    from align.model.head import hidden_target_logps

    with autocast:
        out = hidden_target_logps(hidden[mask], targets[mask], head)
    (out.logps * g[mask]).sum().backward()
    return out.logps


def child(args: argparse.Namespace, method: str, dtype: str, rows: int) -> None:
    import torch

    head, hidden, targets, mask, g = inputs(args, rows, args.length)
    memory_guard(rss_mib(), 0)  # stop cleanly if the machine runs out, rather than swap or OOM
    baseline = rss_mib()
    exact = reset_peak()
    started = time.perf_counter()
    compute(method, dtype, head, hidden, targets, mask, g)
    seconds = time.perf_counter() - started
    peak = vm_hwm_mib() if exact else rss_mib()  # without the reset: only the RSS now
    figures = {"seconds": seconds, "peak_above_mib": peak - baseline, "exact_peak": exact}
    figures["threads"] = torch.get_num_threads()
    print("BENCH " + json.dumps(figures), flush=True)


def check(args: argparse.Namespace, dtype: str) -> None:
    """Both methods on CHECK_SHAPE positions: the same log-probs and gradients, or an error."""
    results = []
    for method in METHODS:
        head, hidden, targets, mask, g = inputs(args, *CHECK_SHAPE)
        logps = compute(method, dtype, head, hidden, targets, mask, g)
        results.append((logps.detach(), hidden.grad, head.weight.grad))
    (a, ha, wa), (b, hb, wb) = results
    logps_tol, grad_tol = TOLERANCES[dtype]
    worst = {
        "logps_max_abs": (a - b).abs().max().item(),
        "hidden_grad_rel": ((ha - hb).norm() / ha.norm()).item(),
        "weight_grad_rel": ((wa - wb).norm() / wa.norm()).item(),
    }
    print("CHECK " + json.dumps(worst), flush=True)
    limits = {"logps_max_abs": logps_tol, "hidden_grad_rel": grad_tol, "weight_grad_rel": grad_tol}
    bad = {k: v for k, v in worst.items() if not v <= limits[k]}
    if bad:
        raise SystemExit(f"{dtype}: the two methods disagree: {bad} (limits {limits})")


def run(command: list[str]) -> tuple[str, str, int]:
    result = subprocess.run(command, capture_output=True, text=True)
    return result.stdout, result.stderr, result.returncode


def estimate_mib(args: argparse.Namespace, method: str, dtype: str, rows: int) -> float:
    """A generous guess of a run's peak above its inputs: today holds the logits and their
    gradient; hidden one chunk of logits and its gradient in float32 (align.model.head)."""
    positions = rows * args.length
    if method == "today":
        per = 4 if dtype == "fp32" else 2
        need = 2.2 * positions * args.vocab * per
    else:
        need = 4 * (1 << 26) * 4  # a few chunks of CHUNK_ELEMENTS float32 logits
    need += 2 * args.vocab * args.hidden * 4  # the weight's gradient and a copy
    return need / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="sequences in the micro-batch (8)")
    parser.add_argument("--fp32-rows", type=int, default=4, help="rows for fp32 (4; see above)")
    parser.add_argument("--length", type=int, default=2048, help="positions per row (2048)")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size (896)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (151,936)")
    parser.add_argument(
        "--trained-fraction", type=float, default=1.0, help="trained share of positions (1)"
    )
    parser.add_argument("--dtypes", default="bf16,fp32", help="bf16 (autocast) and/or fp32")
    parser.add_argument("--repeat", type=int, default=2, help="runs per method; medians")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--check", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, dtype, rows = args.child
        child(args, method, dtype, int(rows))
        return
    if args.check:
        check(args, args.check)
        return

    base = [sys.executable, __file__, "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    base += ["--length", str(args.length), "--trained-fraction", str(args.trained_fraction)]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}; head {args.hidden} -> {args.vocab}")
    results: dict = {"settings": vars(args), "dtypes": {}}
    for dtype in args.dtypes.split(","):
        out, err, code = run(base + ["--check", dtype])
        if code:
            raise SystemExit(f"{dtype} check failed:\n{err[-3000:]}")
        agreement = json.loads(next(x for x in out.splitlines() if x.startswith("CHECK "))[6:])
        shown = ", ".join(f"{k} {v:.2e}" for k, v in agreement.items())
        where = "x".join(map(str, CHECK_SHAPE))
        print(f"{dtype}: today and hidden agree on {where} positions ({shown})", flush=True)
        rows = args.rows if dtype == "bf16" else min(args.rows, args.fp32_rows)
        figures: dict[str, list[dict]] = {m: [] for m in METHODS}
        skipped: dict[str, str] = {}
        for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits both
            for method in METHODS:
                if method in skipped:
                    continue
                need, free = estimate_mib(args, method, dtype, rows), available_mib()
                if need > free - 1024:
                    skipped[method] = f"needs about {need:.0f} MiB, {free:.0f} MiB available"
                    continue
                out, err, code = run(base + ["--child", method, dtype, str(rows)])
                line = next((x for x in out.splitlines() if x.startswith("BENCH ")), None)
                if code or line is None:
                    stopped = next((x for x in out.splitlines() if "BENCH-STOPPED" in x), "")
                    skipped[method] = f"stopped: {stopped or err.strip()[-500:]}"
                    continue
                figures[method].append(json.loads(line[len("BENCH ") :]))
        trained = round(args.length * args.trained_fraction)
        print(
            f"\n{dtype}, {rows} x {args.length} positions ({rows} x {trained} trained), "
            f"forward + backward:\n{'method':8} {'s':>8} {'+MiB':>9}   runs",
            flush=True,
        )
        summary = {}
        for method in METHODS:
            if method in skipped:
                print(f"{method:8} skipped: {skipped[method]}")
                continue
            seconds = statistics.median(f["seconds"] for f in figures[method])
            peak = statistics.median(f["peak_above_mib"] for f in figures[method])
            summary[method] = {"seconds": seconds, "peak_above_mib": peak}
            runs = ", ".join(
                f"{f['seconds']:.2f}s/{f['peak_above_mib']:.0f}" for f in figures[method]
            )
            print(f"{method:8} {seconds:8.2f} {peak:9.0f}   {runs}")
        if len(summary) == 2:
            new, old = summary["hidden"], summary["today"]
            time_ratio = new["seconds"] / old["seconds"]
            memory_ratio = new["peak_above_mib"] / old["peak_above_mib"]
            summary["ratios"] = {"seconds": time_ratio, "peak_above_mib": memory_ratio}
            print(f"hidden/today: time {time_ratio:.2f}x, peak memory {memory_ratio:.3f}x")
        results["dtypes"][dtype] = {
            "rows": rows,
            "agreement": agreement,
            "runs": figures,
            "skipped": skipped,
            **summary,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
