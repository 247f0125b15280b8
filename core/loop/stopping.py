"""Stopping a run on purpose: on SIGINT/SIGTERM (save, then exit), and on a NaN or infinite
loss or gradient (name the step and its examples; or skip the step and count it)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AlignError


class RunStopped(AlignError):
    """The run stopped before its last step; ``exit_code`` is what the process exits with,
    ``run_dir`` the run's directory (when a signal stopped it with a checkpoint)."""

    def __init__(self, message: str, exit_code: int = 1, run_dir: Path | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.run_dir = run_dir


class StopSignals:
    """While active, SIGINT, SIGTERM and SIGHUP ask the loop to stop after the current step.

    A repeated signal changes nothing (``torchrun`` forwards the terminal's Ctrl-C, so a
    worker may get it twice); SIGKILL is the way to stop at once, and checkpoints survive it.
    A signal the process was started ignoring (``nohup``) stays ignored. Nothing on the way
    to the checkpoint may fail for want of a console: see :mod:`align.console`.
    """

    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
    )

    def __init__(self, announce: bool, on_signal: Callable[[], None] | None = None) -> None:
        self.received = 0
        self.announce = announce
        self.on_signal = on_signal  # told at once (the run directory's lock says "stopping")
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            return
        self.received = signum
        if self.on_signal is not None:
            with contextlib.suppress(Exception):  # nothing here may keep the run from saving
                self.on_signal()
        if self.announce:  # os.write: print() may be inside a write to stderr already
            name = signal.Signals(signum).name
            notice = (
                f"\n{name}: stopping after this step and saving a checkpoint (SIGKILL stops at "
                "once; the last checkpoint stays usable)\n"
            )
            # Raised here, an error would stop the run wherever it is, unsaved: the same
            # Ctrl-C may have stopped the pipe's reader (`| tee`), or there is no stderr.
            with contextlib.suppress(OSError):
                os.write(2, notice.encode())

    def requested(self, accelerator: Any) -> int:
        """The signal any process received (0 if none); every process must call this."""
        if accelerator.num_processes == 1:
            return self.received
        import torch.distributed as dist

        flag = torch.tensor([self.received], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


# -- non-finite values ------------------------------------------------------------------------
def nonfinite(loss: float, grad_norm: Any, scaler_handles_gradients: bool) -> str | None:
    """``"loss"`` or ``"gradient"`` when that is NaN or infinite, else None.

    Under fp16 the gradient scaler skips steps whose gradients overflowed (and lowers its
    scale); those are its business, so only the loss is checked then."""
    if not math.isfinite(loss):
        return "loss"
    if not scaler_handles_gradients and not math.isfinite(float(grad_norm)):
        return "gradient"
    return None


@dataclass
class Offenders:
    """The records a non-finite loss or gradient is put down to.

    ``own``: records whose own loss (alone, in a batch of one) is not finite. ``together``:
    records of micro-batches whose loss is not finite although no record's is alone (the
    records together make it so). ``batch``: records named by their micro-batch, untried one by
    one (``why``), or, for a bad gradient, every record of the step."""

    what: str
    own: list[str] = field(default_factory=list)
    together: list[str] = field(default_factory=list)
    batch: list[str] = field(default_factory=list)
    why: str = ""

    def records(self) -> list[str]:
        return self.own + self.together + self.batch

    def describe(self, source: str, limit: int = 20) -> str:
        """``Records whose own loss is not finite: train.jsonl: line 3`` and the like."""
        if self.what == "gradient":
            return f"Examples in this step's batch: {source}: {_listed(self.batch, limit)}"
        parts = []
        if self.own:
            parts.append(f"Records whose own loss is not finite: {source}: {_listed(self.own)}")
        if self.together:
            parts.append(
                "Records of micro-batches with a non-finite loss, none of them non-finite "
                f"alone (together they make it so): {source}: {_listed(self.together, limit)}"
            )
        if self.batch:
            parts.append(
                f"Records of the micro-batches with a non-finite loss ({self.why}): {source}: "
                f"{_listed(self.batch, limit)}"
            )
        return "; ".join(parts) if parts else f"no record of {source} named"


def _listed(where: list[str], limit: int = 20) -> str:
    more = f" and {len(where) - limit} more" if len(where) > limit else ""
    return ", ".join(where[:limit]) + more


Probe = Callable[[list[dict[str, Any]]], bool]


def offending_examples(
    group: Sequence[tuple[list[int], Any]],
    micro_losses: Sequence[torch.Tensor],
    what: str,
    examples: Any,
    accelerator: Any,
    finite_alone: Probe | None = None,
    why_not: str = "",
) -> Offenders:
    """Where the step's bad values came from, over every process. For a non-finite loss, each
    example of a micro-batch whose loss is not finite is tried alone: ``finite_alone([example])``
    (the step's batch building and loss, under ``torch.no_grad()``) tells whether its own loss
    is finite; a micro-batch in which none is non-finite alone is named whole (``together``).
    Without ``finite_alone`` (``why_not`` says why) the micro-batches are named. For a bad
    gradient, every example of the step. Collective: every process calls this, and tries as
    many examples as the process with the most to try (a forward under FSDP or ZeRO-3 gathers
    weights from every process), the surplus on an example of its own, its result unused."""
    from accelerate.utils import gather_object

    found: list[tuple[str, str]] = []  # (kind, record)
    why = why_not or "not tried one by one"
    bad = [
        sorted(indices)
        for (indices, _batch), loss in zip(group, micro_losses, strict=True)
        if what == "gradient" or not torch.isfinite(loss).all()
    ]
    if what == "gradient" or finite_alone is None:
        found = [("batch", _describe(examples[i], i)) for indices in bad for i in indices]
    else:
        tries = sum(len(indices) for indices in bad)
        most = _most(tries, accelerator)
        with torch.no_grad(), _kept_rng(accelerator):
            for indices in bad:
                alone, failure = [], None
                for i in indices:
                    try:
                        if not finite_alone([examples[i]]):
                            alone.append(i)
                    except Exception as exc:  # a loss that takes no batch of one
                        failure = f"a batch of one failed: {type(exc).__name__}: {exc}"
                if alone:
                    found += [("own", _describe(examples[i], i)) for i in alone]
                else:
                    kind = "together" if failure is None else f"batch:{failure}"
                    found += [(kind, _describe(examples[i], i)) for i in indices]
            spare = group[0][0][0] if group and group[0][0] else None
            for _ in range(most - tries):  # the forwards the other processes make
                if spare is not None:
                    with contextlib.suppress(Exception):
                        finite_alone([examples[spare]])
    if accelerator.num_processes > 1:
        found = list(gather_object(found))
    out = Offenders(what)
    for kind, record in found:
        if kind == "own":
            out.own.append(record)
        elif kind == "together":
            out.together.append(record)
        else:
            out.batch.append(record)
            out.why = kind.partition(":")[2] or why
    return out


def _most(count: int, accelerator: Any) -> int:
    """The largest ``count`` of any process."""
    if accelerator.num_processes == 1:
        return count
    import torch.distributed as dist

    value = torch.tensor([count], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _kept_rng(accelerator: Any) -> Any:
    """Random state put back afterwards: trying examples again draws no dropout masks from the
    run's generators."""
    device = torch.device(getattr(accelerator, "device", "cpu"))
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.random.fork_rng(devices=[index])


def _describe(example: dict[str, Any], index: int) -> str:
    return example.get("record") or f"example {index}"


def nonfinite_message(
    step: int, what: str, value: Any, where: Offenders, source: str, last_checkpoint: Any
) -> str:
    keep = (
        f"The last good checkpoint is {last_checkpoint}; the weights were not updated."
        if last_checkpoint
        else "No checkpoint was written before it (every --save-minutes, 10 by default, or "
        "--save-every N steps)."
    )
    return (
        f"step {step}: the {what} is {value} (not finite). {where.describe(source)}. {keep} "
        "Check those records, lower --lr, or pass --on-nonfinite skip to skip such steps and "
        "count them."
    )
