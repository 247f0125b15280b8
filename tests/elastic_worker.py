"""``align run`` under ``torchrun --max-restarts``, whose rank 1 is killed (SIGKILL) in the
middle of step 3 of the first attempt: its gradients are computed, the optimizer has not
stepped. torchrun then restarts every worker, and the run must continue by itself."""

import os
import signal

from align.cli import main
from align.loop import train

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
    step = train.accumulate_gradients
    calls = []

    def killed_in_step_three(*args, **kwargs):
        loss = step(*args, **kwargs)
        calls.append(loss)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    train.accumulate_gradients = killed_in_step_three

main()
