"""``align run --num-processes N``: launch N data-parallel processes through torchrun, and make
sure a run trains on the number of processes it asked for.

``accelerate launch --cpu --num_processes 2`` silently runs one process; a run that asked for
N and got another number refuses to train instead of training differently.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError

# Seconds torchrun gives workers to save a checkpoint after SIGINT/SIGTERM before SIGKILL.
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SHUTDOWN_TIMEOUT = "900"


def is_launched() -> bool:
    """True inside a process that a launcher (torchrun, accelerate launch) started."""
    return "WORLD_SIZE" in os.environ


def needs_launch(num_processes: int | None) -> bool:
    return bool(num_processes and num_processes > 1 and not is_launched())


def launch(num_processes: int, run_args: list[str]) -> int:
    """Run ``align run RUN_ARGS`` on ``num_processes`` local processes; their exit status.

    On a machine without CUDA the workers run on CPU (gloo), which Accelerate does only when
    told to (``ACCELERATE_USE_CPU``). With CUDA, each process takes one GPU.
    """
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if torch.cuda.is_available():
        if torch.cuda.device_count() < num_processes:
            raise ConfigError(
                f"--num-processes {num_processes}: only {torch.cuda.device_count()} GPU(s) here"
            )
    else:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    os.environ.setdefault(SHUTDOWN_TIMEOUT_ENV, SHUTDOWN_TIMEOUT)
    args = ["--standalone", "--nproc_per_node", str(num_processes)]
    try:
        run(parse_args([*args, "-m", "align.cli", "run", *run_args]))
    except ChildFailedError as exc:  # the workers printed their errors
        _rank, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except Exception as exc:  # torchrun's SignalException: it stopped the workers first
        sigval = getattr(exc, "sigval", None)
        if sigval is None:
            raise
        return 128 + int(sigval)
    return 0


def check_world_size(requested: int | None, state: Any) -> None:
    """Refuse to train on another number of processes than ``--num-processes`` asked for."""
    if requested is not None and requested != state.num_processes:
        raise ConfigError(
            f"--num-processes {requested}, but this run has {state.num_processes} process(es). "
            "On CPU, `accelerate launch --cpu --num_processes N` starts one process: use "
            "`align run --num-processes N`, `torchrun --nproc_per_node N -m align.cli run …` "
            "or `accelerate launch --multi_gpu --num_processes N` with ACCELERATE_USE_CPU=true."
        )
