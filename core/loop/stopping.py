"""Stopping a run on purpose: on SIGINT/SIGTERM (save, then exit), and on a NaN or infinite
loss or gradient (name the step and its examples; or skip the step and count it)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import AlignError


class RunStopped(AlignError):
    """The run stopped before its last step; ``exit_code`` is what the process exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


def offending_examples(
    group: Sequence[tuple[list[int], Any]],
    micro_losses: Sequence[torch.Tensor],
    what: str,
    examples: list[dict[str, Any]],
    accelerator: Any,
) -> list[str]:
    """Where the step's bad examples came from, over every process: those of micro-batches
    whose loss is not finite; for a bad gradient, every example of the step. Collective."""
    from accelerate.utils import gather_object

    mine = []
    for (indices, _batch), loss in zip(group, micro_losses, strict=True):
        if what == "gradient" or not torch.isfinite(loss).all():
            mine += [_describe(examples[i], i) for i in sorted(indices)]
    if accelerator.num_processes > 1:
        mine = list(gather_object(mine))
    return mine


def _describe(example: dict[str, Any], index: int) -> str:
    return example.get("record") or f"example {index}"


def nonfinite_message(
    step: int, what: str, value: Any, where: list[str], source: str, last_checkpoint: Any
) -> str:
    shown = ", ".join(where[:20]) + (f" and {len(where) - 20} more" if len(where) > 20 else "")
    keep = (
        f"The last good checkpoint is {last_checkpoint}; the weights were not updated."
        if last_checkpoint
        else "No checkpoint was written before it (--save-every N)."
    )
    return (
        f"step {step}: the {what} is {value} (not finite). Examples in this step's "
        f"{'micro-batches with a non-finite loss' if what == 'loss' else 'batch'}: "
        f"{source}: {shown}. {keep} Check those records, lower --lr, or pass "
        "--on-nonfinite skip to skip such steps and count them."
    )
