"""DeepSpeed ZeRO through Accelerate (``accelerate launch --config_file deepspeed_zero3.yaml``):
the DeepSpeed config checked and completed so that ``P`` processes × batch ``b`` still train as
one process × batch ``P·b``.

align scales every micro-batch's loss before its backward (``step.accumulate_gradients``) and
drives the engine itself: each backward is ``engine.backward(loss, scale_wrt_gas=False)`` with
the gradient-accumulation boundary set on the step's last micro-batch, then one
``engine.step()`` clips (DeepSpeed's ``gradient_clipping`` = ``--max-grad-norm``), updates
(skipped by DeepSpeed when the gradient is not finite) and zeroes. So the DeepSpeed options that
would change the batch, the clipping or the update are taken from align's options when the
config leaves them ``auto``, and refused when it sets other values.

On a machine without CUDA, DeepSpeed's CPU accelerator runs the processes over gloo (oneCCL is
not needed): :func:`process_group_backend`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from ..errors import ConfigError

TESTED_STAGES = (2, 3)


def uses_deepspeed() -> bool:
    """``accelerate launch`` with a DeepSpeed config (it sets ``ACCELERATE_USE_DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group_backend(cpu: bool) -> dict[str, str]:
    """``PartialState``'s backend for a DeepSpeed launch: gloo without CUDA (Accelerate names
    none there, and then runs every process as a world of one), else Accelerate's choice.
    Refuses ``use_cpu``/``ACCELERATE_USE_CPU``, under which Accelerate drops DeepSpeed
    silently and trains plain data-parallel processes."""
    if not uses_deepspeed():
        return {}
    if cpu:
        raise ConfigError(
            "the Accelerate config asks for DeepSpeed and for the CPU (use_cpu: true or "
            "ACCELERATE_USE_CPU=true), and Accelerate then ignores DeepSpeed: set use_cpu: false "
            "and unset ACCELERATE_USE_CPU (without a GPU DeepSpeed runs on its CPU accelerator; "
            "DS_ACCELERATOR=cpu)"
        )
    return {} if torch.cuda.is_available() else {"backend": "gloo"}


def _set(config: dict[str, Any], dotted: str, wanted: Any, why: str) -> None:
    """Fill ``dotted`` with ``wanted`` when absent or ``auto``; refuse another value."""
    *path, key = dotted.split(".")
    for part in path:
        config = config.setdefault(part, {})
    given = config.get(key, "auto")
    if given == "auto" or given is None:
        config[key] = wanted
    elif given != wanted:
        raise ConfigError(f"the DeepSpeed config sets {dotted} {given!r}, but {why}")


def configure(accelerator: Any, cfg: Any, on_policy: bool) -> None:
    """Check the DeepSpeed config against the run's options and complete it, before the model
    is loaded (ZeRO-3's ``zero.Init`` would partition it at load) and prepared."""
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    processes = accelerator.num_processes
    if stage not in TESTED_STAGES:
        raise ConfigError(
            f"DeepSpeed ZeRO stage {stage}: align runs ZeRO stages 2 and 3 under DeepSpeed; "
            "for plain data parallelism use examples/accelerate/multi_gpu.yaml"
        )
    if on_policy:
        raise ConfigError(
            "on-policy objectives sample completions, which align does not do under DeepSpeed "
            "yet; use data-parallel processes (--num-processes N)"
        )
    if stage == 3 and plugin.zero3_init_flag:
        raise ConfigError(
            "zero3_init_flag: true (deepspeed.zero.Init) partitions the model while it loads, "
            "but align runs it whole before DeepSpeed prepares it (the log-prob head's probe, "
            "the precomputed reference's pass): set zero3_init_flag: false"
        )
    if stage == 3:
        # Accelerate hands transformers the DeepSpeed config even with zero3_init_flag false,
        # and from_pretrained then partitions the model as it loads: take it back.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(
                f"the DeepSpeed config has a {section!r} section: align builds the {section} "
                "from its own options (--lr, --weight-decay, --lr-scheduler, …); remove it"
            )
    if config.get("fp16", {}).get("enabled") in (True, "true"):
        raise ConfigError(
            "fp16 under DeepSpeed is not supported: its dynamic loss scaler skips updates on its "
            "own, unseen by align's step count and schedule, and it is untested; use bf16"
        )
    if config.get("bf16", {}).get("enabled") in (True, "true"):
        # DeepSpeed's bf16 keeps a bf16 model; a non-finite gradient must still skip the step.
        _set(config, "bf16.check_grad_overflow", True, "align skips a non-finite gradient")
        if accelerator.is_main_process:
            print(
                "DeepSpeed bf16: the model trains in bf16 (fp32 master weights in the optimizer) "
                "and is saved in bf16, unlike align's bf16 autocast over fp32 weights",
                file=sys.stderr,
                flush=True,
            )
    batch, accum = cfg.batch_size, cfg.grad_accum
    _set(
        config,
        "train_micro_batch_size_per_gpu",
        batch,
        f"align's --batch-size is {batch} (give the batch size there, or auto)",
    )
    _set(
        config,
        "gradient_accumulation_steps",
        accum,
        f"align's --grad-accum is {accum} (give it there, or auto)",
    )
    _set(
        config,
        "train_batch_size",
        batch * accum * processes,
        f"--batch-size {batch} × --grad-accum {accum} × {processes} processes is "
        f"{batch * accum * processes} (or auto)",
    )
    _set(
        config,
        "gradient_clipping",
        float(cfg.max_grad_norm),
        f"align's --max-grad-norm is {cfg.max_grad_norm} (give it there, or auto; 0: none)",
    )
    if stage == 3:  # final/ and checkpoints hold the full model, gathered
        _set(
            config,
            "zero_optimization.stage3_gather_16bit_weights_on_model_save",
            True,
            "align saves the full model (final/, checkpoints): set zero3_save_16bit_model: true",
        )
    plugin.gradient_accumulation_steps = accum
    plugin.gradient_clipping = float(cfg.max_grad_norm)
    accelerator.gradient_accumulation_steps = accum  # else prepare() warns of a mismatch


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    # (getattr: plugin test suites drive the step with a stand-in for the accelerator)
    return getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED


def backward(engine: Any, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward through the engine: its loss already scaled by align (no
    division by the accumulation steps), the gradients reduced at the step's last one."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine: Any) -> tuple[float, bool]:
    """The engine's update (clipping, the optimizer, zeroing the gradients); the gradient's
    norm before clipping, and whether the update was applied (DeepSpeed skips a step whose
    gradient is not finite, and its norm is then inf)."""
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float("nan") if norm is None else float(norm)
    return norm, bool(engine.was_step_applied())
