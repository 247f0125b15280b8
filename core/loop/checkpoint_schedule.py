"""When a run writes a checkpoint: every ``--save-every N`` steps, or by default every
``--save-minutes`` (10) minutes of training, the newest two kept.

The time is read on the main process and agreed by every process at a step boundary (one
all-reduce a step), so that under FSDP or DeepSpeed every process saves at the same step.
No checkpoint follows the last step: ``final/`` is written then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

DEFAULT_KEEP_LAST = 2  # with the default, time-based interval, unless --keep-last says


class CheckpointSchedule:
    """A run's checkpoint interval (``cfg``: its core options) and how many to keep."""

    def __init__(self, cfg: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = cfg.save_every  # None: every save_minutes; 0: never
        self.timed = cfg.save_every is None
        self.seconds = cfg.save_minutes * 60
        self.keep_last = cfg.keep_last
        if self.keep_last is None and self.timed:
            self.keep_last = DEFAULT_KEEP_LAST
        self.clock = clock
        self.since = clock()

    def restart(self) -> None:
        """Count the interval from now: training starts, or a checkpoint was written."""
        self.since = self.clock()

    def due(self, step: int, last_step: int, accelerator: Any) -> bool:
        """Whether to checkpoint after ``step``; every process calls this after every step."""
        if step == last_step or self.every == 0:
            return False
        if not self.timed:
            return step % self.every == 0
        late = accelerator.is_main_process and self.clock() - self.since >= self.seconds
        return _agreed(late, accelerator)


def _agreed(flag: bool, accelerator: Any) -> bool:
    """The main process's ``flag``, on every process."""
    if accelerator.num_processes == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
