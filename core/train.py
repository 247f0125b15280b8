"""The training loop: set up, build data, step, log, evaluate, checkpoint.

Nothing here is specific to an objective: the selected objective's plugin builds batches and
computes the loss through hooks, and any plugin may add metrics or prepare the model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import demo
from .checkpoint import save_model_dir, write_json
from .config import RunSpec
from .deviation import deviation_sums
from .errors import ConfigError, PluginError
from .formats import DataReport, tokenize_records
from .loading import load_causal_lm
from .metrics import MetricsLog, MetricSums, means
from .objective import LossOutput
from .objective_hooks import ObjectiveHooks
from .plugins import PluginRegistry
from .records import fingerprint, read_records
from .reference_setup import copy_starting_model, make_reference
from .run import Run
from .sharding import ShardedBatches


def log(accelerator: Any, message: str) -> None:
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


# -- set-up ---------------------------------------------------------------------------------------
def apply_demo_defaults(spec: RunSpec) -> bool:
    """Fill model, data and demo hyperparameters when neither --model nor --data was given."""
    cfg = spec.config
    if cfg.model is None and cfg.data is None:
        fmt = spec.objective.item.data_format
        updates = {k: v for k, v in demo.DEMO_SETTINGS.items() if k not in cfg.model_fields_set}
        updates["model"] = str(demo.demo_model_path())
        updates["data"] = str(demo.demo_data(fmt, "train"))
        if cfg.eval_data is None:
            updates["eval_data"] = str(demo.demo_data(fmt, "eval"))
        spec.config = cfg.model_copy(update=updates)
        return True
    if cfg.data is None:
        raise ConfigError(
            "--data is required when --model is given (run without both to train the embedded demo)"
        )
    if cfg.model is None:
        raise ConfigError(
            "--model is required when --data is given (run without both to train the embedded demo)"
        )
    return False


def prepare_output_dir(cfg: Any, objective: str) -> Path:
    if cfg.output_dir:
        out = Path(cfg.output_dir)
    else:
        out = Path("runs") / f"{objective}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if (out / "run.json").exists():
        if not cfg.overwrite:
            raise ConfigError(
                f"{out} already holds a run (run.json); choose another "
                "--output-dir or pass --overwrite"
            )
        for name in ("run.json", "metrics.jsonl", "final", "checkpoints", "logs"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output directory {out} is not writable: {exc.strerror}") from None
    return out


def shared_output_dir(cfg: Any, objective: str) -> Path:
    """Prepare the output directory on the main process only and share its path (or error)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator reads it
    result: list[str | None] = [None, None]
    if state.is_main_process:
        try:
            result[0] = str(prepare_output_dir(cfg, objective))
        except (ConfigError, OSError) as exc:  # every process must hear of it, or they wait
            result[1] = str(exc) if isinstance(exc, ConfigError) else f"output directory: {exc}"
    if state.num_processes > 1:
        broadcast_object_list(result)
    if result[1] is not None:
        raise ConfigError(result[1])
    return Path(result[0])


def load_tokenizer(cfg: Any) -> Any:
    """The model's tokenizer, with a pad token (EOS when it has none) and right padding."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {cfg.model!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"model {cfg.model!r}: the tokenizer has neither a pad nor an EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model_and_tokenizer(cfg: Any, **load_kwargs: Any) -> tuple[Any, Any]:
    """Load through ``from_pretrained``: safetensors weights only, remote code only on request.

    ``load_kwargs`` come from plugin sections (a quantisation config, say)."""
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg.model, cfg.trust_remote_code, **load_kwargs)
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model, tokenizer


def build_examples(
    hooks: ObjectiveHooks, cfg: Any, path: str, split: str
) -> tuple[list[dict[str, Any]], DataReport]:
    """Read and tokenise one split, then let the objective's plugin prepare it."""
    examples, report = tokenize_records(
        read_records(path),
        hooks.objective.data_format,
        hooks.tokenizer,
        cfg.max_length,
        cfg.truncation,
        split,
    )
    examples = hooks.prepare_dataset(examples, split, cfg)
    report.examples = len(examples)
    for index, example in enumerate(examples):
        example["index"] = index
    return examples, report


def make_optimizer(model: Any, cfg: Any) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (parameters with fewer than 2 dims)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
    )


def make_scheduler(optimizer: Any, cfg: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
    return get_scheduler(
        name[cfg.lr_scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )


# -- one step -------------------------------------------------------------------------------------
LossFn = Callable[[dict[str, Any]], tuple[LossOutput, dict[str, tuple[Any, Any]]]]


def accumulate_gradients(
    model: Any,
    micro_batches: list[dict[str, Any]],
    compute: LossFn,
    accelerator: Any,
    sums: MetricSums,
) -> float:
    """Backward every micro-batch, then make the gradient that of one large batch.

    Each loss hook returns a *sum* over its units and their count. The summed gradients are
    scaled by ``world_size / Σcount`` (Σ over micro-batches and processes; DDP averages over
    processes), which equals the gradient of ``Σloss / Σcount`` over the accumulated batch.
    Returns that loss.
    """
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            output, extra = compute(batch)
            accelerator.backward(output.loss)
        loss_sum += output.loss.detach().double().cpu()
        count += torch.as_tensor(output.count, dtype=torch.float64).detach().sum().cpu()
        sums.add_output(output, extra)
        sums.add(
            "num_tokens", sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")), 1
        )
    totals = torch.stack([loss_sum, count])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
    if totals[1] <= 0:
        raise PluginError("the loss hook reported a count of 0 loss units for a whole step")
    scale = accelerator.num_processes / totals[1].item()
    for param in model.parameters():
        if param.grad is not None:
            param.grad.mul_(scale)
    return (totals[0] / totals[1]).item()


def micro_batch_groups(loader: Any, grad_accum: int) -> Iterator[list]:
    """Endless groups of ``grad_accum`` micro-batches; an epoch's last group may be shorter."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        group: list = []
        for batch in loader:
            group.append(batch)
            if len(group) == grad_accum:
                yield group
                group = []
        if group:
            yield group
        epoch += 1


# -- the run --------------------------------------------------------------------------------------
def train(spec: RunSpec, registry: PluginRegistry) -> Path:
    """Run training for a resolved spec; return the output directory."""
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    transformers.utils.logging.disable_progress_bar()
    started = time.time()

    # Set up: output directory, Accelerate, model, reference, model-preparation plugins.
    used_demo = apply_demo_defaults(spec)
    cfg, objective = spec.config, spec.objective.item
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision fp16 needs a CUDA GPU; use bf16 on CPU")
    if cfg.eval_deviation and not cfg.eval_data:
        raise ConfigError("--eval-deviation is measured on the eval split: give --eval-data")
    out = shared_output_dir(cfg, cfg.objective)
    tracker = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    accelerator = Accelerator(mixed_precision=cfg.precision, log_with=tracker, project_dir=out)
    set_seed(cfg.seed)
    if used_demo:
        log(accelerator, f"No --model and --data: training the embedded demo ({cfg.model}).")
    load_kwargs: dict[str, Any] = {}
    for name, registered in registry.sections.items():
        if registered.item.load_kwargs is not None:
            load_kwargs.update(registered.item.load_kwargs(spec.sections[name], accelerator.device))
    model, tokenizer = load_model_and_tokenizer(cfg, **load_kwargs)
    starting_copy = copy_starting_model(spec, model)
    model = registry.chain_hook(
        "align_prepare_model",
        "model",
        model,
        tokenizer=tokenizer,
        config=cfg,
        sections=spec.sections,
    )

    # Data: tokenise every split once, report what was truncated or skipped.
    hooks = ObjectiveHooks(registry, spec, tokenizer)
    splits = {"train": cfg.data, "eval": cfg.eval_data}
    examples, reports = {}, {}
    for split, path in splits.items():
        if path:
            examples[split], reports[split] = build_examples(hooks, cfg, path, split)
            log(accelerator, f"data {reports[split].summary()}")
    reference, reference_info = None, None
    if objective.needs_reference or cfg.eval_deviation:
        scored = examples if objective.needs_reference else {"eval": examples["eval"]}
        reference, reference_info = make_reference(
            spec, model, tokenizer, scored, accelerator, starting_copy
        )
        del starting_copy
        log(
            accelerator,
            f"reference: {reference_info['mode']} mode, {reference_info['ref_model']}"
            f"{_adapter_note(reference_info)}; "
            f"set up in {reference_info['setup_seconds']}s",
        )
    loaders = {
        split: ShardedBatches(
            split_examples,
            cfg.batch_size,
            hooks.build_batch,
            accelerator,
            shuffle=split == "train",
            seed=cfg.seed,
            split=split,
        )
        for split, split_examples in examples.items()
    }
    loader, eval_loader = loaders["train"], loaders.get("eval")
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # Optimizer and schedule.
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = Run(
        config=cfg,
        accelerator=accelerator,
        tokenizer=tokenizer,
        output_dir=out,
        max_steps=total_steps,
    )
    if accelerator.is_main_process:
        run_info = describe_run(spec, registry, splits, reports, accelerator, total_steps)
        if reference_info is not None:
            run_info["reference"] = reference_info
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

    # The loop: step, log, evaluate, checkpoint.
    log(
        accelerator,
        f"Training {objective.name} ({spec.objective.plugin.label}) for "
        f"{total_steps} steps on {accelerator.num_processes} process(es); "
        f"output: {out}",
    )
    progress = tqdm(total=total_steps, desc=objective.name, disable=not accelerator.is_main_process)
    sums = MetricSums()
    num_tokens = 0.0
    model.train()
    groups = micro_batch_groups(loader, cfg.grad_accum)
    for step in range(1, total_steps + 1):
        micro_batches = next(groups)
        run.step = step - 1
        learning_rate = scheduler.get_last_lr()[0]
        loss = accumulate_gradients(model, micro_batches, compute, accelerator, sums)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.step = step  # updates taken, as evaluation and checkpoints after this one see it
        sums.add("grad_norm", grad_norm, 1)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")

        if step % cfg.log_every == 0 or step == total_steps:
            totals = sums.totals(accelerator)
            sums.clear()
            num_tokens += totals.pop("num_tokens")[0]
            values = hooks.derive(means(totals))
            metrics_log.write(
                {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "learning_rate": learning_rate,
                    **values,
                    "num_tokens": int(num_tokens),
                }
            )
        last = step == total_steps
        if eval_loader is not None and (last or cfg.eval_every and step % cfg.eval_every == 0):
            metrics_log.write({"step": step, **evaluate()})
        if cfg.save_every and step % cfg.save_every == 0 and not last:
            (out / "checkpoints").mkdir(exist_ok=True)
            save_model_dir(
                accelerator,
                model,
                tokenizer,
                out / "checkpoints" / f"step-{step}",
                {"step": step, "epoch": round(step / steps_per_epoch, 4)},
            )
    progress.close()
    save_model_dir(accelerator, model, tokenizer, out / "final", {"step": total_steps})
    metrics_log.close()
    accelerator.end_training()
    if accelerator.num_processes > 1:  # a process group left up can abort the exit (gloo)
        accelerator.state.destroy_process_group()
    if accelerator.is_main_process:
        run_info.update(status="completed", seconds=round(time.time() - started, 1))
        write_json(out / "run.json", run_info)
    log(
        accelerator,
        f"Done in {time.time() - started:.1f}s. Model: {out / 'final'}; "
        f"metrics: {out / 'metrics.jsonl'}",
    )
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
        "data": {
            split: {"path": path, "sha256": fingerprint(path), **reports[split].as_dict()}
            for split, path in splits.items()
            if path
        },
        "num_processes": accelerator.num_processes,
        "total_steps": total_steps,
        "status": "running",
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
