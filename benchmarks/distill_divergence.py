"""The distillation divergence alone: GKD's generalised JSD between a student's and a teacher's
next-token distributions at N positions, forward and backward, two (or three) ways.

    python benchmarks/distill_divergence.py                         # CPU, 512 positions
    python benchmarks/distill_divergence.py --rows 4096 --methods blockwise
    python benchmarks/distill_divergence.py --device cuda --rows 4096 --dtype bf16

A student head ``nn.Linear(--student-hidden 896, --vocab 151936)`` (Qwen2.5-0.5B's) and a teacher
head ``nn.Linear(--teacher-hidden 1536, 151936)`` (Qwen2.5-1.5B's), random weights, float32; the
hidden states of ``--rows`` positions; ``--beta`` (0.5) and ``--temperature`` (1). ``--dtype bf16``
runs under autocast (float32 weights, bf16 matmuls, as ``align run --precision bf16`` trains).
The methods, each the loss's forward and its backward to the student's hidden states and weight:

- ``full``: both models' full logits (``OutputHead.logits``: ``[N, V]`` float32 each), then the
  operations of TRL's GKD ``generalized_jsd_loss`` (log-softmax, the mixture's logsumexp, two
  ``kl_div``; written out here so the script runs without TRL) and autograd;
- ``blockwise``: ``align_distillation.divergence.generalized_jsd``, a block of the vocabulary at a
  time, forward and backward;
- ``trl`` (when TRL is installed): TRL 1.16's ``_chunked_divergence_loss`` (Triton kernels on a
  CUDA device, torch tiles elsewhere).

Each measurement is a fresh process. The inputs (heads, hidden states) are allocated first; on
the CPU the peak RSS (``VmHWM``) is then reset to the RSS, and ``+MiB`` is the peak above it
during forward and backward; on CUDA ``+MiB`` is ``max_memory_allocated`` above the allocated
memory then. Both include the student weight's gradient (``V × 896 × 4`` bytes: 519 MiB at the
default shape), whichever the method. ``s`` is the wall time of forward and backward (CUDA:
synchronised; the median of ``--repeat`` runs, after one warm-up in the same process on CUDA).
A run whose estimated peak does not fit the memory available is skipped with a message. Before
the timings a small case (``--check-rows`` positions, the full vocabulary) checks that all the
methods give the same loss and gradients.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins" / "distillation"))  # before the package is installed

METHODS = ("full", "blockwise", "trl")


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def available_mib(device: str) -> float:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / 2**20
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def inputs(args: argparse.Namespace, rows: int):
    """The two heads and both models' hidden states at ``rows`` positions, seeded; the teacher
    roughly agrees with the student (its weight extends the student's, plus noise)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab, width, teacher_width = args.vocab, args.student_hidden, args.teacher_hidden
    student = torch.nn.Linear(width, vocab, bias=False)
    teacher = torch.nn.Linear(teacher_width, vocab, bias=False)
    with torch.no_grad():
        student.weight.normal_(0, 0.05, generator=generator)
        teacher.weight.normal_(0, 0.02, generator=generator)
        shared = min(width, teacher_width)
        teacher.weight[:, :shared] += student.weight[:, :shared]
    teacher.requires_grad_(False)
    hidden = torch.randn(rows, width, generator=generator)
    extra = torch.randn(rows, max(teacher_width - width, 0), generator=generator)
    teacher_hidden = torch.cat([hidden, extra], -1)[:, :teacher_width]
    device = torch.device(args.device)
    student, teacher = student.to(device), teacher.to(device)
    hidden = hidden.to(device).requires_grad_(True)
    return student, teacher, hidden, teacher_hidden.to(device)


def full_logits_jsd(student_logits, teacher_logits, beta: float, temperature: float):
    """TRL GKD's ``generalized_jsd_loss`` (TRL 1.16, ``reduction="batchmean"`` over ``[N, V]``),
    its operations written out."""
    import torch
    import torch.nn.functional as F

    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-b), teacher_log_probs + torch.log(b)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum() / jsd.shape[0]


def compute(method: str, args, student, teacher, hidden, teacher_hidden):
    """The loss (the mean over positions) of one method, forward and backward."""
    import torch

    from align.model.head import OutputHead

    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    with autocast:
        if method == "full":
            with torch.no_grad():
                teacher_logits = OutputHead(teacher).logits(teacher_hidden)
            student_logits = OutputHead(student).logits(hidden)
            loss = full_logits_jsd(student_logits, teacher_logits, args.beta, args.temperature)
        elif method == "blockwise":
            from align_distillation.divergence import generalized_jsd

            divergence, _ = generalized_jsd(
                hidden,
                OutputHead(student),
                teacher_hidden,
                OutputHead(teacher),
                args.beta,
                args.temperature,
            )
            loss = divergence.mean()
        else:
            from trl.trainer.distillation_trainer import _chunked_divergence_loss

            mask = torch.ones(1, hidden.shape[0], device=hidden.device)
            loss, _, _ = _chunked_divergence_loss(
                hidden[None],
                teacher_hidden[None],
                student.weight,
                teacher.weight,
                mask,
                args.beta,
                temperature=args.temperature,
            )
    loss.backward()
    return loss.detach()


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def child(args: argparse.Namespace, method: str) -> None:
    import torch

    student, teacher, hidden, teacher_hidden = inputs(args, args.rows)
    if args.device == "cuda":  # a warm-up: kernels compiled and loaded before the timing
        compute(method, args, student, teacher, hidden, teacher_hidden)
        student.weight.grad = hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline, exact = torch.cuda.memory_allocated() / 2**20, True
    else:
        baseline, exact = rss_mib(), reset_peak()
    started = time.perf_counter()
    loss = compute(method, args, student, teacher, hidden, teacher_hidden)
    synchronize(args.device)
    seconds = time.perf_counter() - started
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = vm_hwm_mib() if exact else rss_mib()  # without the reset: only the RSS now
    figures = {"seconds": seconds, "peak_above_mib": peak - baseline, "exact_peak": exact}
    figures["loss"] = loss.item()
    print("BENCH " + json.dumps(figures), flush=True)


def check(args: argparse.Namespace, methods: list[str]) -> dict:
    """All methods on ``--check-rows`` positions: the same loss and gradients, or an error."""
    results = {}
    for method in methods:
        student, teacher, hidden, teacher_hidden = inputs(args, args.check_rows)
        loss = compute(method, args, student, teacher, hidden, teacher_hidden)
        results[method] = (loss, hidden.grad, student.weight.grad)
    reference = results["full"] if "full" in results else next(iter(results.values()))
    worst = {}
    for method, (loss, grad_hidden, grad_weight) in results.items():
        worst[method] = {
            "loss_rel": (abs(loss - reference[0]) / reference[0].abs()).item(),
            "hidden_grad_rel": ((grad_hidden - reference[1]).norm() / reference[1].norm()).item(),
            "weight_grad_rel": ((grad_weight - reference[2]).norm() / reference[2].norm()).item(),
        }
    limit = 1e-4 if args.dtype == "fp32" else 2e-2
    bad = {m: w for m, w in worst.items() if max(w.values()) > limit}
    if bad:
        raise SystemExit(f"the methods disagree (limit {limit}): {bad}")
    return worst


def estimate_mib(args: argparse.Namespace, method: str) -> float:
    """A generous guess of a run's peak above its inputs: the full logits' path holds about a
    dozen ``[N, V]`` float32 tensors at once (both models' logits, log-probs, the mixture's
    stack, the KL terms, their gradients); the chunked ones a few 128 MiB blocks."""
    need = 14 * args.rows * args.vocab * 4 if method == "full" else 1 << 30
    need += 2 * args.vocab * args.student_hidden * 4  # the weight's gradient and a copy
    return need / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="positions in the loss (512)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (151,936)")
    parser.add_argument("--student-hidden", type=int, default=896, help="student width (896)")
    parser.add_argument("--teacher-hidden", type=int, default=1536, help="teacher width (1536)")
    parser.add_argument("--beta", type=float, default=0.5, help="TRL's beta (0.5: the JSD)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--methods", default="full,blockwise,trl", help="of full,blockwise,trl")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; medians (1)")
    parser.add_argument("--check-rows", type=int, default=16, help="positions of the check (16)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args, args.child)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if "trl" in methods and not trl_available():
        print("trl: not installed, its row is not run")
        methods.remove("trl")

    settings = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"]
    settings = [s for s in settings if not s.startswith(("--json=", "--methods="))]
    print(
        f"{args.device}, {args.dtype}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
        f"student {args.student_hidden} -> {args.vocab}, teacher {args.teacher_hidden} -> "
        f"{args.vocab}; beta {args.beta}, temperature {args.temperature}"
    )
    agreement = check(args, methods)
    for method, worst in agreement.items():
        shown = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
        print(f"check at {args.check_rows} positions, {method} against {methods[0]}: {shown}")
    results: dict = {"settings": vars(args), "check": agreement, "methods": {}}
    print(
        f"\n{args.rows} positions:\n| method | +MiB peak | seconds | loss |\n|---|---:|---:|---:|"
    )
    for method in methods:
        need, free = estimate_mib(args, method), available_mib(args.device)
        if need > 0.8 * free:
            print(f"| {method} | not run: needs about {need:,.0f} MiB, {free:,.0f} free | | |")
            continue
        runs = []
        for _ in range(args.repeat):
            command = [sys.executable, __file__, *settings, f"--child={method}"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
            line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH "))
            runs.append(json.loads(line[6:]))
        peak = statistics.median(r["peak_above_mib"] for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        exact = "" if all(r["exact_peak"] for r in runs) else " (RSS at the end: no peak reset)"
        print(f"| {method} | {peak:,.0f}{exact} | {seconds:.2f} | {runs[0]['loss']:.6f} |")
        results["methods"][method] = runs
        if not math.isfinite(runs[0]["loss"]):
            raise SystemExit(f"{method}: the loss is not finite")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
