"""The training loop, a recipe that reads top to bottom: set up, resume, then for every step
train, log, evaluate and checkpoint; finish.

:func:`train` is the whole run. :class:`Training` holds its state, one method per phase; the
set-up's pieces (options and output directory, data, model, reference, optimizer, the run's
record) are methods too, called in order by ``__init__``. Nothing here is specific to an
objective: the selected objective's plugin builds batches and computes the loss through hooks,
and any plugin may add metrics or prepare the model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..config import RunSpec
from ..console import RUN_LOGGER
from ..data.batching import count_sequence_tokens, is_packed_batch, sequence_prefixes
from ..data.build import Built
from ..data.examples import DataReport
from ..data.packing import set_default_layout
from ..data.sharding import ShardedBatches
from ..data.sources import mixture_fingerprint
from ..data.store import Examples
from ..data.streaming import StreamPosition
from ..errors import AlignError, ConfigError, PluginError
from ..model import dropout
from ..model.attention import attention_implementation, packing_options
from ..model.head import decide_head, describe_head
from ..model.loading import (
    PACKED_ATTENTION_ENV,
    packed_attention_implementation,
    saved_sequence_classifier,
    switch_attention,
)
from ..model.probe import why_not_packable
from ..plugins.api import LossOutput
from ..plugins.hooks import ObjectiveHooks
from ..plugins.registry import PluginRegistry
from ..reference.deviation import deviation_sums
from ..reference.setup import copy_starting_model, make_reference, why_reference_cannot_pack
from ..reference.teacher import load_teacher
from ..rollout.engine import RolloutEngine
from ..rollout.mixed import round_on_policy, sampling_prompt
from ..run import Run
from . import failures, hub, model_card, resume, rundir, trackers, zero
from .checkpoint import save_model_dir, write_json
from .checkpoint_schedule import CheckpointSchedule
from .data import (
    build_examples,
    check_streaming,
    data_sources,
    shared_fingerprints,
    streaming_batches,
)
from .describe import parameter_counts, run_name, run_title, trainable_share
from .failures import RunFailed
from .launch import (
    check_world_size,
    cpu_processes_join,
    drop_ddp_wrapper,
    engine,
    fsdp_on_cpu,
    join_restarted_attempt,
)
from .manifest import manifest_size
from .metrics import TOKEN_COUNTS, MetricsLog, MetricSums, format_value, headline, means
from .quiet import quiet_third_party
from .runlog import LOG_FILE, RunLog
from .setup import (
    OutputDir,
    apply_demo_defaults,
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


def log(accelerator: Any, message: str) -> None:
    """A line for the user, from the main process: the console and the run's train.log."""
    if accelerator.is_main_process:
        logging.getLogger(RUN_LOGGER).info(message)


# -- the run --------------------------------------------------------------------------------------
def train(spec: RunSpec, registry: PluginRegistry) -> Path:
    """Run training for a resolved spec (or continue it, ``--resume``); return the output
    directory. Raises :class:`RunStopped` when a signal or a non-finite value stops it."""
    return run_training(spec, registry).out


def run_training(spec: RunSpec, registry: PluginRegistry) -> Training:
    """As :func:`train`; return the finished run (its model, tokenizer and last metrics)."""
    run = Training(spec, registry)  # set-up: everything that can be refused, then the model
    try:
        return _train(run)
    finally:
        run.runlog.close()


def _train(run: Training) -> Training:
    try:
        try:
            signals = run.run_steps()
        except RunStopped as stopped:  # recorded in run.json already
            run.runlog.record(str(stopped))  # the command line prints it
            raise
        except BaseException as exc:  # every other failure is recorded too: never "running"
            error = run.fail(exc)
            if error is exc:
                raise
            raise error from None
        if signals.received:
            name = signal.Signals(signals.received).name
            log(
                run.accelerator,
                f"{name} came during the last step or the final save; the run completed.",
            )
        log(run.accelerator, run.summary())
        push_to = run.spec.config.push_to_hub
        if push_to and run.accelerator.is_main_process:  # the run is complete: a failure to
            # push loses nothing; the lock is still held, so no other run clears final/ or
            # writes run.json meanwhile
            try:
                url = hub.push_final(run.out, push_to, run.spec.config.hub_private, run.run_info)
            except AlignError as exc:
                run.runlog.record(f"Error: {exc}")  # the command line prints it
                raise
            log(run.accelerator, f"Pushed final/ to the hub: {url}")
        return run
    finally:
        run.release()  # the directory's lock: another run, or --resume, may take it now


class Training:
    """One run's state, and its phases as methods, in the order :func:`train` calls them."""

    # -- set-up ----------------------------------------------------------------------------------
    def __init__(self, spec: RunSpec, registry: PluginRegistry) -> None:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        quiet_third_party()
        self.runlog = RunLog(spec.config.verbose)
        self.started = time.time()
        self.spec, self.registry = spec, registry
        self.output: OutputDir | None = None
        self.last_checkpoint: Path | None = None  # the newest this run wrote or resumed from
        self.at_step = 0  # the step in progress (0: before the first)
        self.run_info: dict[str, Any] | None = None  # run.json, once the run has started
        try:
            self._check_options_and_output()
            self._read_data()
            self._load_model()
            self._set_up_reference()
            self._read_checkpoint()
            self._set_up_batches_and_optimizer()
        except BaseException:
            self.release()
            self.runlog.close()
            raise

    def run_steps(self) -> StopSignals:
        """From the run's record to the final model: every step trained, logged, evaluated and
        checkpointed as due. Returns the signal handler (what it received)."""
        lock = self.output.lock if self.output is not None else None
        on_signal = lock.stopping if lock is not None else None
        with StopSignals(self.accelerator.is_main_process, on_signal) as signals:
            # From run.json's "running" on, a signal stops the run after a step, with a
            # checkpoint (one during start() waits for the first step).
            self.start()  # run.json and metrics.jsonl: new, or the interrupted run's, continued
            self.saves.restart()  # the time-based interval counts training time
            self.at_step = self.first_step - 1
            if self.trainer_state.get("eval_pending") and self.eval_loader is not None:
                self.evaluate(self.first_step - 1)  # owed by a run stopped before evaluating
            elif self.cfg.eval_on_start and self.first_step == 1 and self.eval_loader is not None:
                self.evaluate(0)
            for step in range(self.first_step, self.total_steps + 1):
                self.at_step = step  # what a failure from here on is recorded at
                self.train_step(step)
                if step % self.cfg.log_every == 0 or step == self.total_steps:
                    self.log_metrics(step)
                last = step == self.total_steps
                stop = 0 if last else signals.requested(self.accelerator)  # the last: final/
                eval_due = self.evaluation_due(step)
                if eval_due and not stop:  # when stopping, the resumed run evaluates first
                    self.evaluate(step)
                if stop or self.checkpoint_due(step):
                    self.save_checkpoint(step, eval_pending=eval_due and bool(stop))
                if stop:
                    self.stop(step, stop)
            self.save_final()  # a signal from here on lets the final model be written first
        return signals

    def _check_options_and_output(self) -> None:
        """Checks that need no model: options, processes, the output directory, and for
        ``--resume`` that the run is the one it continues."""
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DistributedType, parse_flag_from_env, set_seed

        spec = self.spec
        self.used_demo = apply_demo_defaults(spec, self.registry)
        precision_from_launcher(spec)
        cfg = spec.config
        if cfg.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("precision fp16 needs a CUDA GPU; use bf16 on CPU")
        if cfg.eval_deviation and spec.objective.item.model_class != "causal_lm":
            raise ConfigError(
                f"--eval-deviation compares the policy's log-probs with the reference's; "
                f"objective {spec.objective.item.name!r} trains a "
                f"{spec.objective.item.model_class.replace('_', ' ')} model, which has none"
            )
        if cfg.eval_deviation and not cfg.eval_data:
            raise ConfigError("--eval-deviation is measured on the eval split: give --eval-data")
        cpu_processes_join()
        join_restarted_attempt()
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
        state = PartialState(cpu=cpu, **zero.process_group_backend(cpu))  # as Accelerator
        check_world_size(cfg.num_processes, state)
        if not state.is_main_process:
            self.runlog.mute()
        self.output = shared_output_dir(cfg, run_name(spec, self.registry), state)
        self.out, self.checkpoint = self.output.path, self.output.checkpoint
        named = spec.given.named  # records in memory as Python names them: data, eval_data
        self.splits = {"train": named(cfg.data), "eval": named(cfg.eval_data)}
        self.sources = data_sources(cfg, spec.given.data)
        self.fingerprints = shared_fingerprints(self.sources, state, cfg.streaming)
        self.digests = {
            split: mixture_fingerprint(self.sources[split], found)
            for split, found in self.fingerprints.items()
        }
        self.previous, self.changed = None, {}
        if self.checkpoint is not None:
            self.previous = json.loads((self.out / "run.json").read_text(encoding="utf-8"))
        old_config = self.previous.setdefault("config", {}) if self.previous is not None else None
        dropout.resolve(spec, old_config)
        self.cfg = spec.config
        if self.previous is not None:
            self.changed = resume.check_same_run(
                self.previous, spec.as_dict(), self.digests["train"], state.num_processes
            )
        names = trackers.chosen(self.cfg.report_to)
        trackers.check_available(names, spec.named("report_to"))
        hub.check_push(self.cfg.push_to_hub, spec.named("push_to_hub"))
        previous_trackers = (self.previous or {}).get("trackers")
        config = trackers.tracked_config(
            spec.as_dict(), self.registry.requirements(), _library_versions()
        )
        self.accelerator = Accelerator(
            mixed_precision=self.cfg.precision,
            log_with=trackers.build(names, self.out, previous_trackers, config) or None,
            project_dir=self.out,
        )
        fsdp_on_cpu(self.accelerator)
        for note in self.output.notes:  # damaged checkpoints --resume skipped
            self._log(f"--resume: {note}")
        if self.previous is not None:
            resume.check_same_engine(self.previous, engine(self.accelerator))
        self.fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        objective = spec.objective.item
        if self.deepspeed:
            zero.configure(self.accelerator, self.cfg, objective.on_policy)
        sampling = objective.sampling(spec.options) if objective.on_policy else None
        if sampling is not None and sampling.rewards and not spec.rewards:
            names = ", ".join(sorted(self.registry.rewards))
            raise ConfigError(
                f"objective {objective.name!r} learns from rewards of its own samples: give "
                f"--reward NAME[=WEIGHT] (registered: {names}; align rewards describes them)"
            )
        if sampling is not None and sampling.teacher_samples and not objective.needs_teacher:
            raise PluginError(
                f"objective {objective.name!r}: Sampling(teacher_samples=True) samples from a "
                "teacher, and the objective declares none (Objective(needs_teacher=True))"
            )
        if objective.on_policy and self.fsdp:
            raise ConfigError(
                f"objective {objective.name!r} samples completions, which align does not do "
                "under FSDP yet (each process would generate with a shard); use data-parallel "
                "processes (--num-processes N)"
            )
        self.saves = CheckpointSchedule(self.cfg)
        set_seed(self.cfg.seed)

    def _read_data(self) -> None:
        """The tokenizer, then every split's examples (every record checked) and reports."""
        if self.used_demo:
            data = self.spec.given.named(self.cfg.data)
            self._log(f"Training the embedded demo model ({self.cfg.model}) on {data}.")
        if self.spec.demo_note:
            self._log(self.spec.demo_note)
        self.tokenizer = load_tokenizer(self.cfg, self.spec.given.tokenizer)
        self.hooks = ObjectiveHooks(self.registry, self.spec, self.tokenizer)
        self.examples: dict[str, Examples] = {}
        self.reports: dict[str, DataReport] = {}
        self.stores: dict[str, list[Built]] = {}
        self.stream = None
        if self.cfg.streaming:
            check_streaming(self.spec, self.hooks)
            self.stream = streaming_batches(
                self.hooks, self.cfg, self.accelerator, self.spec.given.data
            )
            self.examples["train"], self.reports["train"] = self.stream.examples, self.stream.report
            self._log(
                f"data train: streaming {self.stream.source.label}, tokenised as training reads "
                f"it ({self.stream.workers} worker(s), a shuffle buffer of "
                f"{self.cfg.shuffle_buffer} records); format {self.stream.report.format}"
            )
        for split, sources in self.sources.items():
            if sources is not None and not (split == "train" and self.stream is not None):
                self.examples[split], self.reports[split], self.stores[split] = build_examples(
                    self.hooks, self.cfg, sources, split, self.fingerprints[split], self.accelerator
                )
                self._log(f"data {self.reports[split].summary()}")
                for source, built in zip(sources, self.stores[split], strict=True):
                    named = f" ({source.label})" if len(sources) > 1 else ""
                    self.runlog.detail(f"data {split}{named}: {built.summary()}")
        if self.previous is not None:
            resume.check_same_format(self.previous, self.reports)
        self._check_completions_for_data_rounds()

    def _check_completions_for_data_rounds(self) -> None:
        """``Sampling(on_policy_share < 1)`` trains the rounds it does not sample on the data's
        own completions: a prompt-only training source (any of a mixture's) has none, unless
        the teacher samples those rounds (``teacher_samples``)."""
        objective = self.spec.objective.item
        sampling = objective.sampling(self.spec.options) if objective.on_policy else None
        if sampling is None or sampling.on_policy_share >= 1 or sampling.teacher_samples:
            return
        share = sampling.on_policy_share
        for source in self.sources.get("train") or []:
            fmt, _, _ = self.hooks.format_for(source, streaming=self.stream is not None)
            if fmt.shape != "prompt_only":
                continue
            raise ConfigError(
                f"objective {objective.name!r} trains {1 - share:.0%} of its rounds on the "
                f"data's own completions (Sampling(on_policy_share={share:g})), and the "
                f"training data {source.label} is prompts only (format {fmt.name}): give "
                f"prompt_completion or conversation data, or options of {objective.name!r} "
                "that sample every round"
            )
        # Evaluation scores eval data with completions as it is and samples prompt-only eval
        # data: one eval batch cannot be both.
        shapes = {
            source.label: self.hooks.format_for(source)[0].shape
            for source in self.sources.get("eval") or []
        }
        prompts = [label for label, shape in shapes.items() if shape == "prompt_only"]
        if prompts and len(prompts) < len(shapes):
            others = [label for label in shapes if label not in prompts]
            raise ConfigError(
                f"--eval-data mixes prompt-only sources ({', '.join(prompts)}) with sources "
                f"that have completions ({', '.join(others)}): objective {objective.name!r} "
                f"(Sampling(on_policy_share={share:g})) scores the completions of eval data "
                "that has them and samples after prompt-only eval data, so every eval source "
                "must be of one kind"
            )

    def _load_model(self) -> None:
        """The policy, through the model-preparation plugins, its dropout switched off when
        asked (after the plugins: LoRA's dropout too)."""
        spec, cfg = self.spec, self.cfg
        load_kwargs: dict[str, Any] = {}
        for name, registered in self.registry.sections.items():
            if registered.item.load_kwargs is not None:
                device = self.accelerator.device
                load_kwargs.update(registered.item.load_kwargs(spec.sections[name], device))
        model_class = spec.objective.item.model_class
        pad = self.tokenizer.pad_token_id
        model = load_model(cfg, spec.given.model, model_class, pad, **load_kwargs)
        self.starting_copy = copy_starting_model(spec, model)
        self.model = self.registry.chain_hook(
            "align_prepare_model",
            "model",
            model,
            tokenizer=self.tokenizer,
            config=cfg,
            sections=spec.sections,
        )
        if cfg.disable_dropout:
            zeroed = dropout.disable_dropout(self.model)
            if zeroed:
                self.runlog.detail(f"disable_dropout: {zeroed} dropout probabilities set to 0")
        if model_class == "sequence_classification" and spec.given.model is None:
            self.runlog.detail(_score_head_note(cfg.model, cfg.seed))
        if model_class == "causal_lm":  # a sequence classifier's head gives scores, no log-probs
            reason = decide_head(self.model, "policy", self.accelerator)  # before FSDP shards
            detail = describe_head(self.model) if reason is None else f"log-probs: {reason}"
            self.runlog.detail(detail)
        self.parameters = parameter_counts(self.model)  # before FSDP or ZeRO-3 shards them

    def _choose_packed_attention(self) -> tuple[bool, bool]:
        """On CUDA, packed batches go to a kernel that builds no dense ``T × T`` mask
        (``align.model.attention``): FlexAttention's block mask, or flash attention's sequence
        boundaries where no sequence shares a prompt; rows are then filled to a token budget.
        A model that cannot run it, or fails the packing probe with it, keeps its attention.
        ``$ALIGN_PACKED_ATTENTION`` names the kernel on any device. Returns whether the batches
        share prompts, and whether the packing probe already passed with the new kernel."""
        examples = self.examples["train"][:256]
        shared = self.spec.objective.item.on_policy or any(
            len(sequence_prefixes(example)) > 1 for example in examples
        )
        current = attention_implementation(self.model)
        wanted = packed_attention_implementation(self.accelerator.device, shared)
        reason = switch_attention(self.model, wanted)
        if reason is None and wanted != current:
            reason = why_not_packable(
                self.model, accelerator=self.accelerator, shared_prompts=shared
            )
            if reason:
                switch_attention(self.model, current)
        if reason:
            self.runlog.detail(f"packed attention: {current}, not {wanted}: {reason}")
            return shared, False
        options = packing_options(wanted)
        set_default_layout(**options)
        note = f", rows filled to {options['row_tokens']} tokens" if options["row_tokens"] else ""
        self.runlog.detail(f"packed attention: {wanted}{note}")
        return shared, wanted != current

    def _set_up_reference(self) -> None:
        """The reference (when the objective or --eval-deviation needs one), and whether
        batches are packed: every model that scores them is probed first, before sharding."""
        objective, cfg = self.spec.objective.item, self.cfg
        self.reference, self.reference_info = None, None
        needs_reference = objective.uses_reference(self.spec.options)
        uses_reference = needs_reference or cfg.eval_deviation
        packed = cfg.padding_free and (objective.packable or uses_reference)
        shared, probed = True, False
        set_default_layout()  # the dense mask, capped rows: a previous run's choice is not ours
        chosen = os.environ.get(PACKED_ATTENTION_ENV)
        if packed and (self.accelerator.device.type == "cuda" or chosen):
            shared, probed = self._choose_packed_attention()
        if packed and not probed:
            reason = why_not_packable(
                self.model, accelerator=self.accelerator, shared_prompts=shared
            )
            if reason:
                self._log(f"padding_free: off, {reason}; batches are padded.")
                packed = False
        if uses_reference:
            scored = self.examples if needs_reference else {"eval": self.examples["eval"]}
            self.reference, self.reference_info = make_reference(
                self.spec,
                self.model,
                self.tokenizer,
                scored,
                self.accelerator,
                self.starting_copy,
                packed,
            )
            info = self.reference_info
            self._log(
                f"reference: {info['mode']} mode, {info['ref_model']}{_adapter_note(info)}; "
                f"set up in {info['setup_seconds']}s"
            )
            reason = why_reference_cannot_pack(self.reference, self.accelerator) if packed else None
            if reason:
                self._log(f"padding_free: off, {reason}; batches are padded.")
                packed = False
        del self.starting_copy
        if objective.needs_teacher:
            packed = self._set_up_teacher(packed, shared)
        self.hooks.packed = self.hooks.packed and packed
        if (
            self.hooks.packed
            and not objective.on_policy
            and not is_packed_batch(self.hooks.build_batch(self.examples["train"][:1]))
        ):
            self._log("padding_free: off, the objective's align_build_batch gives padded batches.")
            self.hooks.packed = False
        self.loss_reference = self.reference if needs_reference else None
        self.rollouts = None
        if objective.on_policy:
            self.rollouts = RolloutEngine(
                self.spec, self.registry, self.hooks, self.tokenizer, self.model
            )

    def _set_up_teacher(self, packed: bool, shared: bool) -> bool:
        """``--teacher``, loaded for an objective that distils from one, and handed to its loss;
        returns whether batches stay packed (the teacher must take them too)."""
        teacher = load_teacher(self.cfg, self.tokenizer, self.model, self.accelerator.device)
        teacher.autocast = self.accelerator.autocast
        self.hooks.teacher = teacher
        self._log(
            f"teacher: {teacher.path} on {teacher.device}"
            f"{', ' + self.cfg.teacher_precision if self.cfg.teacher_precision else ''}; "
            f"loaded in {teacher.setup_seconds:.1f}s"
        )
        reason = None
        if packed:
            reason = why_not_packable(teacher.model, "teacher", self.accelerator, shared)
        if reason:
            self._log(f"padding_free: off, {reason}; batches are padded.")
        return packed and not reason

    def _read_checkpoint(self) -> None:
        """``--resume``: the checkpoint's state and weights (after the reference, which the
        starting weights give)."""
        self.trainer_state: dict[str, Any] = {}
        if self.checkpoint is not None:
            self.trainer_state = resume.read_trainer_state(self.checkpoint)
            resume.check_reference(
                self.trainer_state.get("reference"), resume.reference_state(self.reference_info)
            )
            resume.restore_weights(
                self.model,
                self.checkpoint,
                self.cfg.trust_remote_code,
                self.spec.objective.item.model_class,
            )

    def _set_up_batches_and_optimizer(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        # An on-policy objective's micro-batches are prompts, sampled from at each round.
        build = self.hooks.build_batch if self.rollouts is None else _prompts_only
        loaders = {
            split: ShardedBatches(
                split_examples,
                cfg.batch_size,
                build,
                accelerator,
                shuffle=split == "train",
                seed=cfg.seed,
                split=split,
                group_by_length=cfg.group_by_length,
            )
            for split, split_examples in self.examples.items()
            if not (split == "train" and self.stream is not None)
        }
        self.loader, self.eval_loader = loaders.get("train", self.stream), loaders.get("eval")
        self.reuse = self.rollouts.sampling.reuse if self.rollouts is not None else 1
        self.share = self.rollouts.sampling.on_policy_share if self.rollouts is not None else 1.0
        if self.stream is not None:  # no epochs known: the run is --max-steps long
            self.steps_per_epoch = cfg.max_steps
        else:
            self.steps_per_epoch = math.ceil(len(self.loader) / cfg.grad_accum) * self.reuse
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        optimizer = make_optimizer(self.model, cfg, fused=not self.fsdp)
        self.scheduler = make_scheduler(optimizer, cfg, self.total_steps)
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        resume.attach(accelerator)
        self.first_step = self.trainer_state.get("step", 0) + 1
        if self.checkpoint is not None:
            resume.restore_training_state(accelerator, self.scheduler, self.checkpoint)
        self.run = Run(
            config=cfg,
            accelerator=accelerator,
            tokenizer=self.tokenizer,
            output_dir=self.out,
            max_steps=self.total_steps,
            step=self.first_step - 1,
        )
        self.sums = MetricSums()
        self.token_counts = {n: float(self.trainer_state.get(n, 0.0)) for n in TOKEN_COUNTS}
        self.skipped_steps = int(self.trainer_state.get("skipped_steps", 0))
        if accelerator.is_main_process:  # the interrupted run's totals, reduced over processes
            self.sums.add_totals(self.trainer_state.get("pending_metrics", {}))
        self.last_checkpoint = self.checkpoint
        self.round: list[tuple[list[int], dict[str, Any]]] | None = None  # on-policy rollouts
        self.reward: float | None = None  # the latest round's mean reward, for the progress bar
        if self.checkpoint is not None and self.rollouts is not None:
            from accelerate.utils import send_to_device

            saved = resume.read_rollouts(self.checkpoint, accelerator.process_index)
            self.round = send_to_device(saved, accelerator.device) if saved else None

    # -- start: the run's record -----------------------------------------------------------------
    def start(self) -> None:
        """Write run.json (new, or the interrupted run's continued), set later checkpoints and
        metrics rows aside on a resume, open the logs, and start the progress bar."""
        accelerator, out, start = self.accelerator, self.out, self.first_step - 1
        restarts = resume.restart_count()  # torchrun's, of these workers
        if self.previous is not None:
            self.run_info = self.previous
            for key in ("stopped_at_step", "failed_at_step", "failure"):
                self.run_info.pop(key, None)
            self.run_info.setdefault("resumed", []).append(
                {
                    "from_step": start,
                    "checkpoint": str(self.checkpoint),
                    "at": datetime.now().isoformat(),
                    "changed": self.changed,
                    **({"elastic_restart": restarts} if restarts else {}),
                }
            )
            self.run_info.update(
                status="running",
                config=self.spec.as_dict(),
                data=data_info(self.splits, self.digests, self.reports),
            )
            if self.output.notes:
                self.run_info["resumed"][-1]["skipped"] = self.output.notes
            self.started -= self.previous.get("seconds", 0.0)  # run.json's: every session's
            self.run_info.pop("elastic", None)  # this job's, set below
        else:
            self.run_info = describe_run(
                self.spec,
                self.registry,
                self.splits,
                self.digests,
                self.reports,
                accelerator,
                self.total_steps,
            )
            self.run_info["packed_batches"] = self.hooks.packed
            self.run_info["owns"] = list(rundir.RUN_ENTRIES)  # a new or empty directory
            if self.reference_info is not None:
                self.run_info["reference"] = self.reference_info
        self.run_info["written_by"] = rundir.written_by()  # align's record: see rundir
        job = resume.elastic_job()  # a restart of these workers continues this run
        if job is not None:
            self.run_info["elastic"] = job
        if accelerator.is_main_process:
            if self.output.replaces_run:  # --overwrite: only now that the new run is set up
                clear_run(out, self.output.owns)
                if restarts:
                    self._log(
                        f"torchrun restarted the workers ({restarts}) before the "
                        "run's first checkpoint: starting it again"
                    )
            if self.checkpoint is not None:
                abandoned = resume.set_aside_later_checkpoints(out, start)  # first: a kill in
                dropped = resume.truncate_metrics(out / "metrics.jsonl", start)  # between: none
                self._log(
                    (f"torchrun restarted the workers ({restarts}): " if restarts else "")
                    + f"Resuming at step {start} of {self.total_steps} from {self.checkpoint}"
                    + (f"; dropped {dropped} metrics rows logged after it" if dropped else "")
                    + (
                        f"; later checkpoints set aside: {', '.join(p.name for p in abandoned)}"
                        if abandoned
                        else ""
                    )
                )
            owns = self.run_info.get("owns")  # a list, or None (the run then claims nothing)
            if isinstance(owns, list) and LOG_FILE not in owns and not (out / LOG_FILE).exists():
                owns.append(LOG_FILE)  # a run resumed from before train.log was written
            write_json(out / "run.json", self.run_info)
            if isinstance(owns, list) and LOG_FILE in owns:  # a resumed run appends
                self.runlog.open_file(out / LOG_FILE)
        if accelerator.log_with:  # after --overwrite cleared the old run's logs/
            started = trackers.start(accelerator, self.first_step)  # {} off the main process
            if accelerator.is_main_process:  # kept: a tracker left out now may come back
                self.run_info["trackers"] = {**self.run_info.get("trackers", {}), **started}
                write_json(out / "run.json", self.run_info)
        self.metrics_log = MetricsLog(out / "metrics.jsonl", accelerator)
        objective, title = self.spec.objective, run_title(self.spec, self.registry)
        self._log(
            f"Training {title} ({objective.plugin.label}) for "
            f"{self.total_steps} steps on {accelerator.num_processes} process(es), "
            f"{engine(accelerator)}; output: {out}"
        )
        self._log(trainable_share(*self.parameters))
        from tqdm.auto import tqdm

        from ..console import tolerant

        self.progress = tqdm(
            total=self.total_steps,
            initial=start,
            desc=title,
            disable=not accelerator.is_main_process,
            file=tolerant(sys.stderr),  # a stop must not fail on a closed pipe (`| tee`)
        )
        self.model.train()
        consumed = math.ceil(start / self.reuse)  # groups of micro-batches taken so far
        if self.stream is not None:
            saved = self.trainer_state.get("data_position", {}).get("stream")
            position = StreamPosition(**saved[accelerator.process_index]) if saved else None
            self.groups = self.stream.groups(self.cfg.grad_accum, position or StreamPosition())
        else:
            self.groups = micro_batch_groups(self.loader, self.cfg.grad_accum, consumed)

    # -- one step --------------------------------------------------------------------------------
    def compute(self, batch: dict[str, Any]) -> tuple[LossOutput, dict[str, tuple[Any, Any]]]:
        return self.hooks.compute(self.model, batch, self.loss_reference, self.run)

    def train_step(self, step: int) -> None:
        """One optimizer step: each micro-batch's counts, then its loss and backward, clipping,
        the update (or, for a non-finite loss or gradient, an error or a skipped step)."""
        accelerator, cfg = self.accelerator, self.cfg
        self.run.step = step - 1
        self.learning_rate = self.scheduler.get_last_lr()[0]
        step_sums, micro_losses = MetricSums(), []
        if self.rollouts is None:
            group = next(self.groups)
        else:  # on-policy: a new round of rollouts every `reuse` steps
            if (step - 1) % self.reuse == 0 or self.round is None:
                self.round = self._sample_round(next(self.groups), step, step_sums)
            group = self.round
        counted = [
            (batch, self.hooks.counts(batch, [self.examples["train"][i] for i in indices]))
            for indices, batch in group
        ]
        loss = accumulate_gradients(
            self.model,
            counted,
            self.compute,
            accelerator,
            step_sums,
            micro_losses,
            allow_empty=self.rollouts is not None,
            count_read_tokens=self.rollouts is None,
        )
        applied = False
        if self.deepspeed:  # the engine clips and updates now, or skips a non-finite gradient
            grad_norm, applied = zero.step(self.model)
        else:
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, the same on every process
            grad_norm = grad_norm.full_tensor()
        bad = nonfinite(loss, grad_norm, scaler_handles_gradients=accelerator.scaler is not None)
        # DeepSpeed applied an update for a non-finite loss (its gradient was finite): too
        # late to skip it, so the run stops whatever --on-nonfinite says.
        applied_anyway = bool(bad) and applied
        if bad:
            value = loss if bad == "loss" else float(grad_norm)
            examples = self.examples["train"]
            where = offending_examples(
                group,
                micro_losses,
                bad,
                examples,
                accelerator,
                finite_alone=self._finite_alone if self.rollouts is None else None,
                why_not="an on-policy micro-batch is not tried one by one",
            )
            if cfg.on_nonfinite == "error" or applied_anyway:
                self.progress.close()
                self.finish("failed", failed_at_step=step, failure=f"non-finite {bad}")
                raise RunStopped(
                    nonfinite_message(step, bad, value, where, cfg.data, self.last_checkpoint)
                )
            self.skipped_steps += 1
            if accelerator.scaler is not None:  # clipping unscaled: the scaler must move on
                accelerator.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self._log(
                f"step {step}: the {bad} is {value}; step skipped ({self.skipped_steps} so far). "
                f"{where.describe(cfg.data)}"
            )
        else:
            self.optimizer.step()  # under DeepSpeed: nothing, the engine has stepped
            self.optimizer.zero_grad(set_to_none=True)
            self.sums.merge(step_sums)
            self.sums.add("grad_norm", grad_norm, 1)
        self.scheduler.step()
        self.run.step = step  # updates taken, as evaluation and checkpoints after this one see
        self.reward = step_sums.reduce().get("reward", self.reward)  # a reused round keeps it
        postfix = {"loss": format_value(loss)}
        if self.reward is not None:  # on-policy: the round's mean reward (TRL's `reward`)
            postfix["reward"] = format_value(self.reward)
        self.progress.set_postfix(postfix, refresh=False)
        self.progress.update(1)  # one refresh, with the new postfix

    def _finite_alone(self, examples: list[dict[str, Any]]) -> bool:
        """Whether the loss of ``examples`` alone, batched and computed as a step does (the
        caller holds ``torch.no_grad()``), is finite in every term."""
        from accelerate.utils import send_to_device

        batch = send_to_device(self.hooks.build_batch(examples), self.accelerator.device)
        output, _ = self.compute(batch)
        return all(
            bool(torch.isfinite(torch.as_tensor(total)).all())
            for total, _count in output.all_terms().values()
        )

    def _sample_round(
        self, group: list[tuple[list[int], Any]], step: int, sums: MetricSums
    ) -> list[tuple[list[int], dict[str, Any]]]:
        """Rollouts for the prompts of one group of micro-batches (round ``(step-1)//reuse``).
        An objective that samples a share of its rounds only (``on_policy_share``) trains the
        others on the data's own batches, or on the teacher's samples (``teacher_samples``)."""
        examples = self.examples["train"]
        prompts = [[examples[i] for i in indices] for indices, _ in group]
        sampler = None  # the policy
        if self.share < 1:
            on_policy = round_on_policy(self.cfg.seed, (step - 1) // self.reuse, self.share)
            sums.add("on_policy", torch.tensor(float(on_policy), dtype=torch.float64), 1)
            if not on_policy and not self.rollouts.sampling.teacher_samples:
                batches = [self._data_batch(part) for part in prompts]
                sums.add("num_tokens", sum(count_sequence_tokens(b) for b in batches), 1)
                return [(indices, b) for (indices, _), b in zip(group, batches, strict=True)]
            if not on_policy:  # GKD's seq_kd: the teacher samples this round
                sampler = self.hooks.teacher.model
        batches = self.rollouts.round(
            self.model,
            prompts,
            (step - 1) // self.reuse,
            "train",
            self.accelerator,
            self.loss_reference,
            self.run,
            sums,
            sampler,
        )
        return [(indices, batch) for (indices, _), batch in zip(group, batches, strict=True)]

    def _data_batch(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """The data's own batch of ``examples`` (their completions), as a round that samples
        nothing trains on it."""
        from accelerate.utils import send_to_device

        batch = send_to_device(self.hooks.build_batch(examples), self.accelerator.device)
        batch["on_policy"] = False
        return batch

    # -- log, evaluate, checkpoint ---------------------------------------------------------------
    def log_metrics(self, step: int) -> None:
        """The metrics since the last log, reduced over processes: one metrics.jsonl row."""
        totals = self.sums.totals(self.accelerator)
        self.sums.clear()
        for name in TOKEN_COUNTS:  # cumulative over the run, over every process
            self.token_counts[name] += totals.pop(name, (0.0, 0.0))[0]
        row = {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "learning_rate": self.learning_rate,
            **self.hooks.derive(means(totals)),
            **{name: int(count) for name, count in self.token_counts.items()},
        }
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        self.metrics_log.write(row)
        self.runlog.record(f"step {step}: {headline(row)}")

    def evaluation_due(self, step: int) -> bool:
        every = self.cfg.eval_every
        due = step == self.total_steps or bool(every) and step % every == 0
        return self.eval_loader is not None and due

    def evaluate(self, step: int) -> None:
        """The eval split's loss and metrics (and drift, with --eval-deviation), in eval mode
        without gradients: a metrics.jsonl row and a line above the progress bar (as TRL
        prints its eval dicts: ``eval step 50: loss 0.6421, rewards/accuracies 1``)."""
        model, cfg = self.model, self.cfg
        model.eval()
        self.run.training = False
        sums = MetricSums()
        with torch.no_grad():
            for number, (indices, batch) in enumerate(self.eval_loader.batches()):
                if self.rollouts is not None:  # sampled afresh, seeded by the batch's number
                    prompts = [self.examples["eval"][i] for i in indices]
                    batch = self._eval_round(prompts, number, sums)
                output, extra = self.compute(batch)
                sums.add_output(output, extra)
                if cfg.eval_deviation and "deviation" not in output.metrics:
                    sums.add("deviation", *deviation_sums(model, batch, self.reference))
        model.train()
        self.run.training = True
        reduced = self.hooks.derive(sums.reduce(self.accelerator))
        values = {f"eval_{k}": v for k, v in reduced.items()}
        self.metrics_log.write({"step": step, **values})
        if not self.progress.disable:  # enabled on the main process only
            line = f"eval step {step}: {headline(values, 'eval_')}"
            self.progress.write(line, file=self.progress.fp)
            self.runlog.record(line)

    def _eval_round(self, examples: list[dict[str, Any]], number: int, sums: MetricSums) -> Any:
        """An on-policy objective's eval batch: sampled, or for one that trains on the data's
        completions part of the time (GKD's λ below 1) those completions (fixed, comparable
        from step to step)."""
        if self.share < 1 and "prompt_input_ids" not in examples[0]:
            return self._data_batch(examples)
        (batch,) = self.rollouts.round(
            self.model,
            [examples],
            number,
            "eval",
            self.accelerator,
            self.loss_reference,
            self.run,
            sums,
        )
        return batch

    def checkpoint_due(self, step: int) -> bool:
        return self.saves.due(step, self.total_steps, self.accelerator)

    def save_checkpoint(self, step: int, eval_pending: bool) -> None:
        """Weights, optimizer, schedule, RNG and this run's counters, written atomically."""
        accelerator = self.accelerator
        target = resume.checkpoint_dir(self.out, step)
        if accelerator.is_main_process:
            target.parent.mkdir(exist_ok=True)
        try:
            self._write_checkpoint(target, step, eval_pending)
        except Exception as exc:
            raise self._write_failure(exc, f"checkpoint {target.name}", target.parent) from None
        if accelerator.is_main_process:
            resume.remove_old_checkpoints(self.out, self.saves.keep_last, target)
        self.last_checkpoint = target
        self.saves.restart()

    def _write_checkpoint(self, target: Path, step: int, eval_pending: bool) -> None:
        accelerator = self.accelerator
        position = {
            "epoch": step // self.steps_per_epoch,
            "micro_batch": step % self.steps_per_epoch * self.cfg.grad_accum,
        }
        if self.stream is not None:  # each process's place in the stream
            from accelerate.utils import gather_object

            position["stream"] = gather_object([self.stream.position.as_dict()])
        resume.save_checkpoint(
            accelerator,
            self.model,
            self.tokenizer,
            self.scheduler,
            target,
            {
                "step": step,
                "epoch": round(step / self.steps_per_epoch, 4),
                "data_position": position,
                "pending_metrics": self.sums.totals(accelerator),
                **self.token_counts,
                "skipped_steps": self.skipped_steps,
                "num_processes": accelerator.num_processes,
                "reference": resume.reference_state(self.reference_info),
                "eval_pending": eval_pending,
            },
            rollouts=self.round if self.reuse > 1 and step % self.reuse else None,
        )

    def _write_failure(self, exc: Exception, what: str, where: Path) -> Exception:
        """A failed write of a checkpoint or the final model, in words (a full disk, a read-only
        file system); any other error is a bug and keeps its traceback."""
        checkpoint = what.startswith("checkpoint")
        needs = self._bytes_needed(checkpoint)
        if isinstance(exc, OSError) or failures.is_disk_full(exc, where, needs):
            return failures.write_failure(exc, what, where, needs, self.last_checkpoint)
        return exc

    def _bytes_needed(self, checkpoint: bool) -> int:
        """About what a checkpoint (or the final model) takes: the last one's size, else the
        weights saved (the adapter's, for a PEFT model) and, in a checkpoint, AdamW's two
        float32 moments of every trained parameter."""
        if checkpoint and self.last_checkpoint is not None:
            size = manifest_size(self.last_checkpoint)
            if size:
                return size
        model = self.accelerator.unwrap_model(self.model)
        params = list(model.parameters())
        trained = [p for p in params if p.requires_grad]
        saved = trained if hasattr(model, "peft_config") else params
        size = sum(p.numel() * p.element_size() for p in saved)
        if checkpoint:
            size += sum(p.numel() * 8 for p in trained)
        return size

    # -- the end ---------------------------------------------------------------------------------
    def stop(self, step: int, signum: int) -> None:
        """A signal came: the checkpoint is written; record the stop and raise RunStopped."""
        self.progress.close()
        self.finish("interrupted", stopped_at_step=step)
        raise RunStopped(
            f"{signal.Signals(signum).name}: stopped after step {step} of {self.total_steps}; "
            f"checkpoint {self.last_checkpoint}. Resume with the same command and --resume "
            f"(--output-dir {self.out}).",
            exit_code=128 + signum,
            run_dir=self.out,
        )

    def save_final(self) -> None:
        self.progress.close()
        final = {"step": self.total_steps}
        target = self.out / "final"
        card = self._model_card() if self.accelerator.is_main_process else None
        try:
            save_model_dir(self.accelerator, self.model, self.tokenizer, target, final, card)
        except Exception as exc:
            raise self._write_failure(exc, "the final model", self.out) from None
        self.finish("completed")

    def _model_card(self) -> Any:
        """What writes final/README.md, the hub's model card (:mod:`.model_card`)."""
        cfg, objective = self.cfg, self.spec.objective
        sources = [s.name for split in self.sources.values() if split for s in split]
        return functools.partial(
            model_card.write_card,
            name=self.out.name,
            objective=objective.item.name,
            provided_by=objective.plugin.label,
            preset=self.spec.preset,
            model=None if self.used_demo else cfg.model,
            datasets=sources,
            config=self.spec.as_dict(),
            requirements=self.registry.requirements(),
            versions=_library_versions(),
            metrics=self.metrics_log.last,
            steps=self.total_steps,
            load_from=cfg.push_to_hub or f"{self.out.name}/final",  # no home path in a card
            model_class=objective.item.model_class,
        )

    def fail(self, exc: BaseException) -> BaseException:
        """Record a failure in run.json (status ``failed`` and the reason; ``interrupted`` for a
        Ctrl-C outside the steps) and close the logs, without waiting for other processes (they
        may be gone). Returns the error to raise: a full disk anywhere, in words."""
        error = exc
        if isinstance(exc, OSError) and failures.is_disk_full(exc, self.out):
            what = f"to {self.out}"
            error = failures.write_failure(exc, what, self.out, None, self.last_checkpoint)
        if self.run_info is None or not self.accelerator.is_main_process:
            return error
        for close in ("progress", "metrics_log"):  # either may not be open yet
            with contextlib.suppress(Exception):
                getattr(self, close).close()
        if self.accelerator.num_processes == 1:
            with contextlib.suppress(Exception):
                self.accelerator.end_training()
        else:  # the trackers only: the other processes may be gone, the group is left alone
            for tracker in getattr(self.accelerator, "trackers", []):
                with contextlib.suppress(Exception):
                    tracker.finish()
        if isinstance(exc, KeyboardInterrupt):
            status, reason = "interrupted", "KeyboardInterrupt outside the training steps"
        else:
            status = "failed"
            reason = " ".join(str(error).split()) or type(error).__name__
            if not isinstance(error, AlignError):
                reason = f"{type(error).__name__}: {reason}"
        self.run_info.update(
            status=status,
            failure=reason,
            failed_at_step=self.at_step,
            seconds=round(time.time() - self.started, 1),
        )
        self.runlog.record(f"{status} at step {self.at_step}: {reason}")
        try:
            write_json(self.out / "run.json", self.run_info)
        except OSError as write_error:  # a full disk: the user is told in words all the same
            note = f" (run.json could not record it: {write_error.strerror})"
            return RunFailed(f"{error if isinstance(error, AlignError) else reason}{note}")
        return error

    def release(self) -> None:
        """Let go of the directory's lock (the main process holds it). A run that never started
        removes its lock file, so the directory it created can go too."""
        lock = self.output.lock if self.output is not None else None
        if lock is not None:
            lock.release(remove=self.run_info is None and rundir.is_unused(self.out))
        groups = getattr(self, "groups", None)
        if getattr(self, "stream", None) is not None and groups is not None:
            groups.close()  # the stream's tokenising workers stop with it
        for built in (b for found in getattr(self, "stores", {}).values() for b in found):
            if built.key is None and self.accelerator.is_local_main_process:
                shutil.rmtree(built.path.parent, ignore_errors=True)  # --no-data-cache's

    def finish(self, status: str, **details: Any) -> None:
        """Close the logs and process group; run.json gets the status and the time taken."""
        self.metrics_log.close()
        accelerator = self.accelerator
        if accelerator.num_processes > 1:
            # Every process done communicating before any tears its group down: a process that
            # destroyed its gloo group while a peer's last collectives were still in flight
            # aborted at exit ("terminate called without an active exception": one resumed
            # ZeRO-3 run in three under load).
            accelerator.wait_for_everyone()
            drop_ddp_wrapper(accelerator, self)
        accelerator.end_training()  # the trackers, then the process group (one left up can
        # abort the exit under gloo)
        if accelerator.is_main_process:
            seconds = round(time.time() - self.started, 1)
            self.run_info.update(status=status, seconds=seconds, **details)
            if status == "completed":
                self.run_info.pop("failure", None)
            if self.skipped_steps:
                self.run_info["skipped_steps"] = self.skipped_steps
            if getattr(self, "stream", None) is not None:  # this process's: a stream has no total
                self.run_info["data"]["train"].update(
                    self.stream.report.as_dict(),
                    streaming=True,
                    counted_by=f"process 0 of {accelerator.num_processes} (this session)",
                )
            write_json(self.out / "run.json", self.run_info)

    def summary(self) -> str:
        adapter = (self.out / "final" / "adapter_config.json").is_file()  # PEFT's save
        return run_summary(
            time.time() - self.started, self.total_steps, self.out, self.metrics_log.last, adapter
        )

    def _log(self, message: str) -> None:
        log(self.accelerator, message)


def _prompts_only(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """An on-policy objective's micro-batch before sampling: its prompts' token ids."""
    return {"prompt_input_ids": [sampling_prompt(e) for e in examples]}


def _score_head_note(model: str, seed: int) -> str:
    """The run log's line on a reward model's head: trained further, or new."""
    if saved_sequence_classifier(model) is not None:
        return f"score head: {model}'s own, trained further"
    if not Path(model).is_dir():
        return f"score head: {model}'s own if it has one, else new (seed {seed})"
    return (
        f"score head: new (hidden size → 1), drawn by transformers' initialisation with seed "
        f"{seed}, as TRL's RewardTrainer leaves it; {model}'s output head is not used"
    )


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
        "engine": engine(accelerator),
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


def run_summary(
    seconds: float, steps: int, out: Path, last: dict[str, dict[str, Any]], adapter: bool = False
) -> str:
    """The line a run ends with: time and steps, the last logged training loss, the final
    evaluation, and where the model (or the ``adapter``) and metrics are."""
    text = f"Done in {seconds:.1f}s, {steps} steps."
    train_row, eval_row = last.get("train", {}), last.get("eval")
    if "loss" in train_row:
        text += f" Train loss {format_value(train_row['loss'])} (step {train_row['step']})."
    if eval_row is not None:
        text += f" Eval (step {eval_row['step']}): {headline(eval_row, 'eval_')}."
    what = "Adapter" if adapter else "Model"
    return f"{text} {what}: {out / 'final'}; metrics: {out / 'metrics.jsonl'}"
