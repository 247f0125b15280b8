"""Setting a run up: demo defaults, the output directory, tokenizer, data, model, optimizer.

Everything that can be refused is checked before the model is loaded: the options, the
output directory (writable, not another run's, or the run ``--resume`` continues) and every
record of the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .. import demo
from ..config import RunSpec, check_model_and_data
from ..errors import ConfigError
from ..model.loading import (
    check_single_score,
    is_sequence_classifier,
    load_pretrained,
    set_pad_token_id,
)
from . import resume, rundir
from .rundir import RunLock


def apply_demo_defaults(spec: RunSpec, registry: Any = None) -> bool:
    """The embedded demo: with neither --model nor --data, the demo model on the objective's
    demo data; ``--data demo`` is that data for a model of one's own (the SFT demo's result,
    say, to train GRPO from), and ``--model demo`` the demo model for data of one's own. Either
    way the demo's hyperparameters fill the options the user did not set, the eval split is the
    demo's unless given (with the demo data), and an on-policy objective is rewarded by
    ``addition`` unless ``--reward`` says otherwise. ``--eval-data demo`` alone is
    the demo's eval split. Returns whether the demo model is used."""
    cfg = spec.config
    shapes = spec.objective.item.shapes
    fmt = next((s for s in shapes if demo.demo_data(s, "train").exists()), shapes[0])
    named_demo = cfg.model in demo.DEMO_MODELS  # demo, demo-small
    whole_demo = (cfg.model is None and cfg.data is None) or (named_demo and not cfg.data)
    demo_model = whole_demo or named_demo
    demo_data = whole_demo or cfg.data == "demo"
    if (demo_data or cfg.eval_data == "demo") and not demo.demo_data(fmt, "train").exists():
        given = "" if demo_model else f"{spec.named('data' if demo_data else 'eval_data')} demo: "
        raise ConfigError(
            f"{given}objective {spec.objective.item.name!r} trains on {' or '.join(shapes)} "
            "data, which has no demo data: give --model and --data"
        )
    updates: dict[str, Any] = {}
    if demo_data or demo_model:
        settings = {**demo.DEMO_SETTINGS}
        if spec.objective.item.on_policy:
            settings.update(demo.ON_POLICY_DEMO_SETTINGS)
        updates = {k: v for k, v in settings.items() if k not in cfg.model_fields_set}
        spec.demo_note = demo_defaults_note(updates, demo_model, demo_data)
    if demo_data:
        updates["data"] = str(demo.demo_data(fmt, "train"))
    if demo_model:
        updates["model"] = str(demo.demo_model_path(cfg.model if named_demo else "demo"))
    if cfg.eval_data == "demo" or (demo_data and cfg.eval_data is None):
        updates["eval_data"] = str(demo.demo_data(fmt, "eval"))
    spec.config = cfg.model_copy(update=updates)
    if demo_data or cfg.eval_data == "demo":
        _demo_rewards(spec, registry)
    if not demo_model:
        check_model_and_data(spec)
    return demo_model


def demo_defaults_note(settings: dict[str, Any], demo_model: bool, demo_data: bool) -> str:
    """The line a run prints first naming the demo's ``settings`` it took, which the user did
    not set, and for which part of the demo (the whole, its model on the user's data, or its
    data for the user's model): the general defaults apply once both are the user's."""
    what = (
        "the demo"
        if demo_model and demo_data
        else "the demo model on your data"
        if demo_model
        else "the demo data"
    )
    values = ", ".join(f"--{key.replace('_', '-')} {_shown(v)}" for key, v in settings.items())
    return f"Demo defaults for {what} (options you set win): {values or 'none left'}"


def _shown(value: Any) -> str:
    """3e-3 rather than 0.003; booleans as on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _demo_rewards(spec: RunSpec, registry: Any) -> None:
    """The demo's sums reward ``addition`` when an on-policy run names no reward."""
    if spec.objective.item.on_policy and not spec.rewards and registry is not None:
        from ..rollout.rewards import ChosenReward

        registered = registry.rewards["addition"]
        reward = registered.item
        spec.rewards = [ChosenReward(reward, 1.0, reward.options(), registered.plugin.label)]


def precision_from_launcher(spec: RunSpec) -> None:
    """Take ``mixed_precision`` from an Accelerate config (``accelerate launch``) when
    ``--precision`` was not given; refuse when the two disagree, rather than let one win."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    cfg = spec.config
    if not launched or launched in ("no", cfg.precision):  # "no": accelerate launch's default
        return
    if "precision" in cfg.model_fields_set:
        raise ConfigError(
            f"--precision {cfg.precision}, but the Accelerate config sets mixed_precision "
            f"{launched}: make them agree"
        )
    if launched not in ("no", "bf16", "fp16"):
        raise ConfigError(
            f"mixed_precision {launched} (from the Accelerate config) is not supported: use "
            "no, bf16 or fp16"
        )
    spec.config = cfg.model_copy(update={"precision": launched})


# -- the output directory -------------------------------------------------------------------------
@dataclass
class OutputDir:
    path: Path
    checkpoint: Path | None = None  # the checkpoint to resume from
    replaces_run: bool = False  # --overwrite: clear the old run once set-up has succeeded
    lock: RunLock | None = None  # held by the main process for the whole run
    notes: list[str] = field(default_factory=list)  # damaged checkpoints skipped, to log
    owns: list[str] = field(default_factory=list)  # what the replaced run wrote (--overwrite)


RUNS = Path("runs")  # where runs go without --output-dir

# The directories this run created, in order, while ``removed_if_unstarted`` is active.
_created_dirs: ContextVar[list[Path] | None] = ContextVar("created_dirs", default=None)


def prepare_output_dir(cfg: Any, name: str) -> OutputDir:
    """Create or check the run directory and take its lock: refuse a non-empty directory that
    holds no align run, one that holds another run (unless ``--overwrite``), one another run
    is writing, or one that is not writable; for ``--resume``, find the checkpoint. Workers that
    torchrun restarted continue the run their job started, whatever the flags say."""
    resume.check_elastic(cfg)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pick one")
    if cfg.resume:
        out = resume.run_dir_of(cfg.resume, cfg.output_dir)
    elif cfg.output_dir:
        out = Path(cfg.output_dir)
    else:
        out = _claim_run_dir(name)
    rundir.check_claimable(out)  # before anything is written there
    _check_writable(out)
    continuing = bool(cfg.resume) or resume.restart_count() > 0
    lock = RunLock(out).acquire(wait_if_stopping=continuing)
    try:
        return _decide(cfg, out, lock)
    except BaseException:
        lock.release(remove=rundir.is_unused(out))
        raise


def _decide(cfg: Any, out: Path, lock: RunLock) -> OutputDir:
    """With the lock held (no other run can change it): what the run does with ``out``."""
    rundir.check_claimable(out, locked=True)
    record = rundir.read_record(out)
    restarted = resume.restarted_run(out, record) if cfg.output_dir else None
    if restarted is not None:  # from its newest intact checkpoint, or again from the start
        checkpoint, notes = restarted
        owns = rundir.owned_entries(out, record) if checkpoint is None else []
        return OutputDir(out, checkpoint, checkpoint is None, lock, notes, owns)
    if cfg.resume:
        checkpoint, notes = resume.find_checkpoint(cfg.resume, out, record)
        return OutputDir(out, checkpoint, lock=lock, notes=notes)
    if record is not None and not cfg.overwrite:
        resumable = record.get("status") != "completed" and resume.complete_checkpoints(out)
        hint = " continue it with --resume," if resumable else ""
        raise ConfigError(
            f"{out} already holds a run (run.json);{hint} choose another --output-dir or "
            "pass --overwrite to replace it"
        )
    owns = rundir.owned_entries(out, record) if record is not None else []
    return OutputDir(out, replaces_run=record is not None, lock=lock, owns=owns)


def _claim_run_dir(run_name: str) -> Path:
    """``runs/<run name>-<time>`` (``sft-…``, ``lora-sft-…``, ``dpo-lora-…``: see
    :func:`align.loop.describe.run_name`), created here and so this run's alone: runs started
    in the same second (a sweep started with ``&``, a job array) take ``-2``, ``-3``, …"""
    name = f"{run_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out, number = RUNS / name, 1
    try:
        _make_dirs(RUNS)
        while True:
            try:
                out.mkdir()  # exclusive: fails if another run holds the name
                break
            except FileExistsError:
                number += 1
                out = RUNS / f"{name}-{number}"
    except OSError as exc:
        raise ConfigError(f"cannot create a run directory in {RUNS}: {exc.strerror}") from None
    _record_created(out)
    return out


def _make_dirs(path: Path) -> None:
    """``mkdir -p``, recording each directory created here (not one another process made)."""
    missing = []
    for directory in [path, *path.parents]:
        if directory.is_dir():
            break
        missing.append(directory)
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        _record_created(directory)


def _record_created(directory: Path) -> None:
    created = _created_dirs.get()
    if created is not None:
        created.append(directory)


@contextlib.contextmanager
def removed_if_unstarted() -> Iterator[None]:
    """On a failure before the run starts (bad data, a model that does not load, Ctrl-C while
    loading), remove the output directories the run created. Only empty ones go: a run that
    started holds run.json, and nothing anyone else wrote is deleted."""
    created: list[Path] = []
    token = _created_dirs.set(created)
    try:
        yield
    except BaseException:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    finally:
        _created_dirs.reset(token)


def clear_run(out: Path, owns: list[str]) -> None:
    """Delete what the run ``--overwrite`` replaces wrote, as its run.json lists it (once the
    new run is set up, so a typo in the new run's options costs nothing); anything else in
    the directory stays."""
    for name in owns:
        target = out / name
        if name == rundir.LOCK:
            continue  # held by this run
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _check_writable(out: Path) -> None:
    try:
        _make_dirs(out)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)  # a new file, its own
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"output directory {out} is not writable: {exc.strerror}") from None


def shared_output_dir(cfg: Any, name: str, state: Any) -> OutputDir:
    """Prepare the output directory on the main process only and share it (or the error)."""
    from accelerate.utils import broadcast_object_list

    result: list[Any] = [None, None]
    mine = None
    if state.is_main_process:
        try:
            mine = prepare_output_dir(cfg, name)
            result[0] = dataclasses.replace(mine, lock=None)  # the lock stays with its holder
        except (ConfigError, OSError) as exc:  # every process must hear of it, or they wait
            result[1] = str(exc) if isinstance(exc, ConfigError) else f"output directory: {exc}"
    if state.num_processes > 1:
        broadcast_object_list(result)
    if result[1] is not None:
        raise ConfigError(result[1])
    return mine or result[0]


# -- tokenizer, data and model --------------------------------------------------------------------
def load_tokenizer(cfg: Any, given: Any = None) -> Any:
    """The model's tokenizer, with a pad token (EOS when it has none) and right padding.

    ``given`` (``align.train(tokenizer=…)``): a directory or hub id to load it from instead
    of the model's, or a tokenizer object, copied (the copy gets the pad token and padding
    side; the caller's object is left as it was), nothing read from disk."""
    from transformers import AutoTokenizer

    from ..model.loading import check_model_source

    if given is not None and not isinstance(given, str):
        import copy

        tokenizer = copy.deepcopy(given)
    else:
        source = given or cfg.model
        check_model_source(source, "tokenizer" if given else "model")
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=cfg.trust_remote_code
            )
        except (OSError, ValueError) as exc:
            what = "tokenizer" if given else "model"
            raise ConfigError(f"cannot load {what} {source!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"model {cfg.model!r}: the tokenizer has neither a pad nor an EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    cfg: Any,
    given: Any = None,
    model_class: str = "causal_lm",
    pad_token_id: int | None = None,
    **load_kwargs: Any,
) -> Any:
    """Load through ``from_pretrained``: safetensors weights only, remote code only on request.

    ``load_kwargs`` come from plugin sections (a quantisation config, say). ``given``
    (``align.train(model=…)``): that model, trained in place as TRL's trainers do, nothing read
    from disk; a section that must load the model its own way is refused for it.
    ``model_class``: the objective's (``Objective.model_class``); a sequence classifier gets
    ``config.pad_token_id`` (the tokenizer's ``pad_token_id``), by which it finds each
    sequence's last token, as TRL's ``RewardTrainer`` sets it."""
    if given is not None:
        if load_kwargs:
            raise ConfigError(
                f"the model was given as an object, but a plugin section loads the model with "
                f"its own settings ({', '.join(sorted(load_kwargs))}): give model as a path or "
                "hub id, or load it with those settings yourself"
            )
        model = given
        if model_class == "sequence_classification":
            if not is_sequence_classifier(model):
                raise ConfigError(
                    f"the objective trains a sequence classifier (a reward model), but the "
                    f"model given is a {type(model).__name__}: give a path, or an "
                    "AutoModelForSequenceClassification with num_labels=1"
                )
            check_single_score(model, "the model given")
    else:
        if model_class == "sequence_classification":  # its new head: drawn from the run's seed
            from transformers import set_seed

            set_seed(cfg.seed)  # right before loading, as TRL's RewardTrainer does
        model = load_pretrained(cfg.model, cfg.trust_remote_code, model_class, **load_kwargs)
    if model_class == "sequence_classification" and pad_token_id is not None:
        set_pad_token_id(model, pad_token_id)
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model


# -- optimizer and schedule -----------------------------------------------------------------------
def make_optimizer(model: Any, cfg: Any, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (parameters with fewer than 2 dims).

    ``fused``: PyTorch's fused kernel (one call for all parameters; on a small model it is
    several times faster than the per-tensor loop), where every parameter is a plain float
    tensor on the CPU or a CUDA device.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fused and all(
        type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused or None,
    )


def make_scheduler(optimizer: Any, cfg: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
    return get_scheduler(
        name[cfg.lr_scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
