"""The training loop: set up, build data, step, log, evaluate, checkpoint, resume.

Nothing here is specific to an objective: the selected objective's plugin builds batches and
computes the loss through hooks, and any plugin may add metrics or prepare the model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..config import RunSpec
from ..data.examples import DataReport
from ..data.records import fingerprint
from ..data.sharding import ShardedBatches
from ..errors import ConfigError
from ..model import dropout
from ..model.probe import why_not_packable
from ..plugins.api import LossOutput
from ..plugins.hooks import ObjectiveHooks
from ..plugins.registry import PluginRegistry
from ..reference.deviation import deviation_sums
from ..reference.setup import copy_starting_model, make_reference, why_reference_cannot_pack
from ..run import Run
from . import resume
from .checkpoint import save_model_dir, write_json
from .launch import check_world_size, cpu_processes_join
from .metrics import MetricsLog, MetricSums, format_value, headline, means
from .setup import (
    apply_demo_defaults,
    build_examples,
    clear_run,
    load_model,
    load_tokenizer,
    make_optimizer,
    make_scheduler,
    precision_from_launcher,
    shared_output_dir,
)
from .step import accumulate_gradients, micro_batch_groups
from .stopping import (
    RunStopped,
    StopSignals,
    nonfinite,
    nonfinite_message,
    offending_examples,
)

DEEPSPEED_REFUSED = (
    "DeepSpeed is not supported yet: align scales each micro-batch's loss before its backward, "
    "as DeepSpeed's engine needs, but runs under DeepSpeed are not tested. Use FSDP for sharded "
    "training (examples/accelerate/fsdp.yaml)."
)


def log(accelerator: Any, message: str) -> None:
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


# -- the run --------------------------------------------------------------------------------------
def train(spec: RunSpec, registry: PluginRegistry) -> Path:
    """Run training for a resolved spec (or continue it, ``--resume``); return the output
    directory. Raises :class:`RunStopped` when a signal or a non-finite value stops it."""
    import transformers
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, parse_flag_from_env, set_seed

    transformers.utils.logging.disable_progress_bar()
    started = time.time()

    # Checks that need no model: options, processes, output directory, data.
    used_demo = apply_demo_defaults(spec)
    precision_from_launcher(spec)
    cfg, objective = spec.config, spec.objective.item
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision fp16 needs a CUDA GPU; use bf16 on CPU")
    if cfg.eval_deviation and not cfg.eval_data:
        raise ConfigError("--eval-deviation is measured on the eval split: give --eval-data")
    cpu_processes_join()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator reads it
    check_world_size(cfg.num_processes, state)
    output = shared_output_dir(cfg, cfg.objective, state)
    out, checkpoint = output.path, output.checkpoint
    splits = {"train": cfg.data, "eval": cfg.eval_data}
    digests = {split: fingerprint(path) for split, path in splits.items() if path}
    previous, changed = None, {}
    if checkpoint is not None:
        previous = json.loads((out / "run.json").read_text(encoding="utf-8"))
    dropout.resolve(spec, previous.setdefault("config", {}) if previous is not None else None)
    cfg = spec.config
    if previous is not None:
        changed = resume.check_same_run(
            previous, spec.as_dict(), digests["train"], state.num_processes
        )
    tracker = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    accelerator = Accelerator(mixed_precision=cfg.precision, log_with=tracker, project_dir=out)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(DEEPSPEED_REFUSED)
    set_seed(cfg.seed)
    if used_demo:
        log(accelerator, f"No --model and --data: training the embedded demo ({cfg.model}).")
    tokenizer = load_tokenizer(cfg)
    hooks = ObjectiveHooks(registry, spec, tokenizer)
    examples, reports = {}, {}
    for split, path in splits.items():
        if path:
            examples[split], reports[split] = build_examples(hooks, cfg, path, split)
            log(accelerator, f"data {reports[split].summary()}")

    # The model, the model-preparation plugins and the reference.
    load_kwargs: dict[str, Any] = {}
    for name, registered in registry.sections.items():
        if registered.item.load_kwargs is not None:
            load_kwargs.update(registered.item.load_kwargs(spec.sections[name], accelerator.device))
    model = load_model(cfg, **load_kwargs)
    starting_copy = copy_starting_model(spec, model)
    model = registry.chain_hook(
        "align_prepare_model",
        "model",
        model,
        tokenizer=tokenizer,
        config=cfg,
        sections=spec.sections,
    )
    if cfg.disable_dropout:  # after the plugins: LoRA's dropout too
        zeroed = dropout.disable_dropout(model)
        if zeroed:
            log(accelerator, f"disable_dropout: {zeroed} dropout probabilities set to 0")
    reference, reference_info = None, None
    uses_reference = objective.needs_reference or cfg.eval_deviation
    packed = cfg.padding_free and (objective.packable or uses_reference)
    if packed:  # a probe forward on every model that scores packed batches, before sharding
        reason = why_not_packable(model, accelerator=accelerator)
        if reason:
            log(accelerator, f"padding_free: off, {reason}; batches are padded.")
            packed = False
    if uses_reference:
        scored = examples if objective.needs_reference else {"eval": examples["eval"]}
        reference, reference_info = make_reference(
            spec, model, tokenizer, scored, accelerator, starting_copy, packed
        )
        del starting_copy
        log(
            accelerator,
            f"reference: {reference_info['mode']} mode, {reference_info['ref_model']}"
            f"{_adapter_note(reference_info)}; "
            f"set up in {reference_info['setup_seconds']}s",
        )
        reason = why_reference_cannot_pack(reference, accelerator) if packed else None
        if reason:
            log(accelerator, f"padding_free: off, {reason}; batches are padded.")
            packed = False
    hooks.packed = hooks.packed and packed
    trainer_state: dict[str, Any] = {}
    if checkpoint is not None:  # after the reference, which the starting weights give
        trainer_state = resume.read_trainer_state(checkpoint)
        resume.check_reference(
            trainer_state.get("reference"), resume.reference_state(reference_info)
        )
        resume.restore_weights(model, checkpoint, cfg.trust_remote_code)

    # Batches, optimizer and schedule.
    loaders = {
        split: ShardedBatches(
            split_examples,
            cfg.batch_size,
            hooks.build_batch,
            accelerator,
            shuffle=split == "train",
            seed=cfg.seed,
            split=split,
            group_by_length=cfg.group_by_length,
        )
        for split, split_examples in examples.items()
    }
    loader, eval_loader = loaders["train"], loaders.get("eval")
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(
        model, cfg, fused=accelerator.distributed_type != DistributedType.FSDP
    )
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    resume.attach(accelerator)
    start = trainer_state.get("step", 0)
    if checkpoint is not None:
        resume.restore_training_state(accelerator, scheduler, checkpoint)
    run = Run(
        config=cfg,
        accelerator=accelerator,
        tokenizer=tokenizer,
        output_dir=out,
        max_steps=total_steps,
        step=start,
    )

    # run.json and metrics.jsonl: new, or the interrupted run's, continued.
    if previous is not None:
        run_info = previous
        for key in ("stopped_at_step", "failed_at_step", "failure"):
            run_info.pop(key, None)
        run_info.setdefault("resumed", []).append(
            {
                "from_step": start,
                "checkpoint": str(checkpoint),
                "at": datetime.now().isoformat(),
                "changed": changed,
            }
        )
        run_info.update(
            status="running", config=spec.as_dict(), data=data_info(splits, digests, reports)
        )
        started -= previous.get("seconds", 0.0)  # run.json's seconds: every session's
    else:
        run_info = describe_run(spec, registry, splits, digests, reports, accelerator, total_steps)
        run_info["packed_batches"] = hooks.packed
        if reference_info is not None:
            run_info["reference"] = reference_info
    if accelerator.is_main_process:
        if output.replaces_run:  # --overwrite: only now that the new run is set up
            clear_run(out)
        if checkpoint is not None:
            abandoned = resume.set_aside_later_checkpoints(out, start)  # first: a kill in
            dropped = resume.truncate_metrics(out / "metrics.jsonl", start)  # between loses none
            log(
                accelerator,
                f"Resuming at step {start} of {total_steps} from {checkpoint}"
                + (f"; dropped {dropped} metrics rows logged after it" if dropped else "")
                + (
                    f"; later checkpoints set aside: {', '.join(p.name for p in abandoned)}"
                    if abandoned
                    else ""
                ),
            )
        write_json(out / "run.json", run_info)
    if tracker:
        accelerator.init_trackers(
            "logs",
            config={
                k: v for k, v in cfg.model_dump().items() if isinstance(v, int | float | str | bool)
            },
        )
    metrics_log = MetricsLog(out / "metrics.jsonl", accelerator)

    loss_reference = reference if objective.needs_reference else None

    def compute(batch: dict[str, Any]) -> tuple[LossOutput, dict[str, tuple[Any, Any]]]:
        return hooks.compute(model, batch, loss_reference, run)

    def evaluate() -> dict[str, float]:
        model.eval()
        run.training = False
        sums = MetricSums()
        with torch.no_grad():
            for batch in eval_loader:
                output, extra = compute(batch)
                sums.add_output(output, extra)
                if cfg.eval_deviation and "deviation" not in output.metrics:
                    sums.add("deviation", *deviation_sums(model, batch, reference))
        model.train()
        run.training = True
        return {f"eval_{k}": v for k, v in hooks.derive(sums.reduce(accelerator)).items()}

    sums = MetricSums()
    num_tokens = float(trainer_state.get("num_tokens", 0.0))
    skipped_steps = int(trainer_state.get("skipped_steps", 0))
    if accelerator.is_main_process:  # the interrupted run's totals, reduced over processes
        sums.add_totals(trainer_state.get("pending_metrics", {}))
    last_checkpoint = checkpoint

    def save_checkpoint(step: int, eval_pending: bool) -> Path:
        target = resume.checkpoint_dir(out, step)
        if accelerator.is_main_process:
            target.parent.mkdir(exist_ok=True)
        resume.save_checkpoint(
            accelerator,
            model,
            tokenizer,
            scheduler,
            target,
            {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "data_position": {
                    "epoch": step // steps_per_epoch,
                    "micro_batch": step % steps_per_epoch * cfg.grad_accum,
                },
                "pending_metrics": sums.totals(accelerator),
                "num_tokens": num_tokens,
                "skipped_steps": skipped_steps,
                "num_processes": accelerator.num_processes,
                "reference": resume.reference_state(reference_info),
                "eval_pending": eval_pending,
            },
        )
        if accelerator.is_main_process:
            resume.remove_old_checkpoints(out, cfg.keep_last, target)
        return target

    def finish(status: str, **details: Any) -> None:
        metrics_log.close()
        accelerator.end_training()
        if accelerator.num_processes > 1:  # a process group left up can abort the exit (gloo)
            accelerator.state.destroy_process_group()
        if accelerator.is_main_process:
            run_info.update(status=status, seconds=round(time.time() - started, 1), **details)
            if skipped_steps:
                run_info["skipped_steps"] = skipped_steps
            write_json(out / "run.json", run_info)

    # The loop: step, log, evaluate, checkpoint; stop on a signal or a non-finite value.
    log(
        accelerator,
        f"Training {objective.name} ({spec.objective.plugin.label}) for "
        f"{total_steps} steps on {accelerator.num_processes} process(es); "
        f"output: {out}",
    )
    from tqdm.auto import tqdm

    from ..console import tolerant

    progress = tqdm(
        total=total_steps,
        initial=start,
        desc=objective.name,
        disable=not accelerator.is_main_process,
        file=tolerant(sys.stderr),  # a stop must not fail on a closed pipe (`| tee`)
    )
    model.train()
    groups = micro_batch_groups(loader, cfg.grad_accum, start)
    with StopSignals(announce=accelerator.is_main_process) as signals:
        if trainer_state.get("eval_pending") and eval_loader is not None:  # owed by a stop
            record_evaluation(metrics_log, progress, start, evaluate())
        for step in range(start + 1, total_steps + 1):
            group = next(groups)
            run.step = step - 1
            learning_rate = scheduler.get_last_lr()[0]
            step_sums, micro_losses = MetricSums(), []
            counted = [
                (batch, hooks.counts(batch, [examples["train"][i] for i in indices]))
                for indices, batch in group
            ]
            loss = accumulate_gradients(
                model, counted, compute, accelerator, step_sums, micro_losses
            )
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            bad = nonfinite(
                loss, grad_norm, scaler_handles_gradients=accelerator.scaler is not None
            )
            if bad:
                value = loss if bad == "loss" else float(grad_norm)
                where = offending_examples(group, micro_losses, bad, examples["train"], accelerator)
                if cfg.on_nonfinite == "error":
                    progress.close()
                    finish("failed", failed_at_step=step, failure=f"non-finite {bad}")
                    raise RunStopped(
                        nonfinite_message(step, bad, value, where, cfg.data, last_checkpoint)
                    )
                skipped_steps += 1
                if accelerator.scaler is not None:  # clipping unscaled: the scaler must move on
                    accelerator.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                log(
                    accelerator,
                    f"step {step}: the {bad} is {value}; step skipped ({skipped_steps} so far). "
                    f"Examples: {cfg.data}: {', '.join(where[:20])}",
                )
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sums.add_totals(step_sums.totals())
                sums.add("grad_norm", grad_norm, 1)
            scheduler.step()
            run.step = step  # updates taken, as evaluation and checkpoints after this one see it
            progress.update(1)
            progress.set_postfix(loss=format_value(loss))

            if step % cfg.log_every == 0 or step == total_steps:
                totals = sums.totals(accelerator)
                sums.clear()
                num_tokens += totals.pop("num_tokens", (0.0, 0.0))[0]
                values = hooks.derive(means(totals))
                row = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "learning_rate": learning_rate,
                    **values,
                    "num_tokens": int(num_tokens),
                }
                if skipped_steps:
                    row["skipped_steps"] = skipped_steps
                metrics_log.write(row)
            last = step == total_steps
            stop = 0 if last else signals.requested(accelerator)  # the last step: save final/
            eval_due = eval_loader is not None and (
                last or bool(cfg.eval_every) and step % cfg.eval_every == 0
            )
            if eval_due and not stop:  # when stopping, the resumed run evaluates first
                record_evaluation(metrics_log, progress, step, evaluate())
            if stop or not last and cfg.save_every and step % cfg.save_every == 0:
                last_checkpoint = save_checkpoint(step, eval_pending=eval_due and bool(stop))
            if stop:
                progress.close()
                finish("interrupted", stopped_at_step=step)
                name = signal.Signals(stop).name
                raise RunStopped(
                    f"{name}: stopped after step {step} of {total_steps}; checkpoint "
                    f"{last_checkpoint}. Resume with the same command and --resume "
                    f"(--output-dir {out}).",
                    exit_code=128 + stop,
                )
        progress.close()  # a signal from here on lets the final model be written first
        save_model_dir(accelerator, model, tokenizer, out / "final", {"step": total_steps})
        finish("completed")
    if signals.received:
        name = signal.Signals(signals.received).name
        log(accelerator, f"{name} came during the last step or the final save; the run completed.")
    log(accelerator, run_summary(time.time() - started, total_steps, out, metrics_log.last))
    return out


def _adapter_note(info: dict[str, Any]) -> str:
    if info["mode"] != "adapter":
        return ""
    if info.get("starting_adapter"):
        return " with the starting adapter (a frozen copy) switched on"
    return " with its adapter switched off"


def describe_run(
    spec: RunSpec,
    registry: PluginRegistry,
    splits: dict[str, str | None],
    digests: dict[str, str],
    reports: dict[str, DataReport],
    accelerator: Any,
    total_steps: int,
) -> dict[str, Any]:
    """What ``run.json`` records: config, plugin versions, data fingerprints, seed."""
    return {
        "objective": spec.objective.item.name,
        "preset": spec.preset,
        "provided_by": spec.objective.plugin.label,
        "config": spec.as_dict(),
        "requirements": registry.requirements(),
        "versions": _library_versions(),
        "seed": spec.config.seed,
        "data": data_info(splits, digests, reports),
        "num_processes": accelerator.num_processes,
        "total_steps": total_steps,
        "status": "running",
    }


def data_info(
    splits: dict[str, str | None], digests: dict[str, str], reports: dict[str, DataReport]
) -> dict[str, Any]:
    """``run.json``'s ``data``: each split's path, sha256 and what happened to its records."""
    return {
        split: {"path": path, "sha256": digests[split], **reports[split].as_dict()}
        for split, path in splits.items()
        if path
    }


def _library_versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def record_evaluation(
    metrics_log: MetricsLog, progress: Any, step: int, values: dict[str, float]
) -> None:
    """Write an evaluation's row and print its line above the progress bar, through the bar's
    stream (as TRL prints its eval dicts): ``eval step 50: loss 0.6421, rewards/accuracies 1``.
    The bar is enabled on the main process only, and so is the line."""
    metrics_log.write({"step": step, **values})
    if not progress.disable:
        progress.write(f"eval step {step}: {headline(values, 'eval_')}", file=progress.fp)


def run_summary(seconds: float, steps: int, out: Path, last: dict[str, dict[str, Any]]) -> str:
    """The line a run ends with: time and steps, the last logged training loss, the final
    evaluation, and where the model and metrics are."""
    text = f"Done in {seconds:.1f}s, {steps} steps."
    train_row, eval_row = last.get("train", {}), last.get("eval")
    if "loss" in train_row:
        text += f" Train loss {format_value(train_row['loss'])} (step {train_row['step']})."
    if eval_row is not None:
        text += f" Eval (step {eval_row['step']}): {headline(eval_row, 'eval_')}."
    return f"{text} Model: {out / 'final'}; metrics: {out / 'metrics.jsonl'}"
