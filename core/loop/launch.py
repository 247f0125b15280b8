"""``align run --num-processes N``: launch N data-parallel processes through torchrun, and make
sure a run trains on the number of processes it asked for.

Started as one plain process (``align run``, or ``accelerate launch --cpu --num_processes 2``,
which silently starts one), ``align run --num-processes N`` starts the N processes itself.
Under a launcher that started processes (it sets ``WORLD_SIZE``), a number other than N, or
processes that did not join as one run, is refused instead of training differently.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError

# Seconds torchrun gives workers to save a checkpoint after SIGINT/SIGTERM before SIGKILL.
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SHUTDOWN_TIMEOUT = "900"


def needs_launch(num_processes: int | None) -> bool:
    """More than one process asked for, and no launcher (they set ``WORLD_SIZE``) started them."""
    return bool(num_processes and num_processes > 1 and "WORLD_SIZE" not in os.environ)


def launch(num_processes: int, run_args: list[str]) -> int:
    """Run ``align run RUN_ARGS`` on ``num_processes`` local processes; their exit status.

    With CUDA each process takes one GPU; without, they run on the CPU (gloo, see
    ``cpu_processes_join``).
    """
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if torch.cuda.is_available() and torch.cuda.device_count() < num_processes:
        raise ConfigError(
            f"--num-processes {num_processes}: only {torch.cuda.device_count()} GPU(s) here"
        )
    os.environ.setdefault(SHUTDOWN_TIMEOUT_ENV, SHUTDOWN_TIMEOUT)
    args = ["--standalone", "--nproc_per_node", str(num_processes)]
    try:
        run(parse_args([*args, "-m", "align.cli", "run", *run_args]))
    except ChildFailedError as exc:  # the workers printed their errors
        _rank, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as exc:  # torchrun stopped the workers (they saved) first
        return 128 + int(exc.sigval)
    return 0


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_processes_join() -> None:
    """Processes a launcher started on a machine without CUDA (torchrun, ``accelerate launch
    --multi_gpu``) each run alone, all as rank 0, unless Accelerate is told to use the CPU:
    tell it (gloo)."""
    import torch

    from .zero import uses_deepspeed

    if launched_processes() > 1 and not torch.cuda.is_available() and not uses_deepspeed():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # (DeepSpeed: its CPU accelerator)


def check_world_size(requested: int | None, state: Any) -> None:
    """Refuse to train when the processes did not join as one run, or when ``--num-processes``
    asked for another number than the launcher started."""
    launched = launched_processes()
    if launched != state.num_processes:
        raise ConfigError(
            f"the launcher started {launched} processes (WORLD_SIZE), but Accelerate runs this "
            f"one as one of {state.num_processes}; on CPU set ACCELERATE_USE_CPU=true, on GPUs "
            "check the devices each process sees"
        )
    if requested is not None and requested != state.num_processes:
        raise ConfigError(
            f"--num-processes {requested}, but the launcher started {state.num_processes} "
            "process(es): give the launcher the same number (torchrun --nproc_per_node, "
            "accelerate launch --num_processes), or run `align run --num-processes "
            f"{requested}` without a launcher, which starts them itself"
        )


def engine(accelerator: Any) -> str:
    """How the processes share the work, in words: ``data-parallel (DDP)``, ``FSDP2``,
    ``DeepSpeed ZeRO-3``… and on how many nodes (torchrun's ``GROUP_WORLD_SIZE``)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if accelerator.num_processes == 1:
        name = "one process"
    elif kind == DistributedType.FSDP:
        name = f"FSDP{getattr(accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    elif kind == DistributedType.DEEPSPEED:
        name = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    else:
        name = "data-parallel (DDP)"
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun's agents, one a node
    return name if nodes <= 1 else f"{name} on {nodes} nodes"


def fsdp_on_cpu(accelerator: Any) -> None:
    """Run an FSDP config's processes under FSDP on a machine without a GPU (gloo).

    Accelerate makes processes on the CPU ``MULTI_CPU`` and drops the FSDP plugin an
    ``accelerate launch`` FSDP config asks for (``ACCELERATE_USE_FSDP``): the run would
    silently be data-parallel. PyTorch's FSDP2 runs on the CPU over gloo, so align turns the
    state to FSDP with the plugin the config describes. Call it before ``prepare``."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set
    if plugin.fsdp_version != 2 or state.mixed_precision != "no":
        raise ConfigError(
            "FSDP on the CPU runs FSDP2 in fp32 here (fsdp_version 2, mixed_precision 'no', "
            "as examples/accelerate/fsdp_cpu.yaml): the config asks for fsdp_version "
            f"{plugin.fsdp_version}, mixed_precision {state.mixed_precision}, untested on the CPU"
        )
    state.fsdp_plugin = plugin
    # Both shared states: every AcceleratorState() copies PartialState's over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP


def join_restarted_attempt() -> None:
    """On a restart of torchrun's workers (``--max-restarts``), join the process group through
    store keys of this attempt alone, before Accelerate joins it.

    torchrun's agent keeps one rendezvous store for every attempt, and the workers no longer
    put the attempt in their keys: a restarted worker can read the previous attempt's
    addresses and connect to a dead peer (gloo: ``connectFullMesh failed … Connection
    refused``). Accelerate leaves a process group that exists alone."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restart or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    world_size = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    import torch

    dist.init_process_group(  # the backend Accelerate would take (DeepSpeed on CPU: gloo too)
        backend="nccl" if torch.cuda.is_available() else "gloo",
        store=dist.PrefixStore(f"align/attempt_{restart}", store),
        rank=int(os.environ["RANK"]),
        world_size=world_size,
    )


def drop_ddp_wrapper(accelerator: Any, owner: Any) -> None:
    """Unwrap ``owner.model`` from DistributedDataParallel and free the wrapper: call it before
    the process group is destroyed (``end_training``).

    DDP's C++ reducer holds a reference to the gloo process group. Left as the group's last
    reference, it destroys the group when the wrapper is freed, holding the GIL (pybind frees
    it so), and ``~ProcessGroupGloo`` joins gloo's worker threads, one of which can be freeing
    a finished collective's Python tensors and so waits for the GIL: the process hangs after
    its run is done (one ``--num-processes 2`` run in about 20 on a loaded machine). Freed
    first, the reducer leaves the group to ``destroy_process_group``, whose Python object
    lets the GIL go before it joins the threads."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(owner.model, DistributedDataParallel):
        return
    owner.model = owner.model.module
    accelerator._models[:] = [
        m for m in accelerator._models if m.__class__ is not DistributedDataParallel
    ]
    gc.collect()  # a wrapper in a reference cycle (its hooks) goes now, with the group alive
