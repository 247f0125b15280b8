"""Checkpoints that continue a run exactly, and finding and checking them.

``checkpoints/step-N/`` is a model directory, like ``final/``, plus:

- ``state/``: what ``Accelerator.save_state`` writes (the optimizer, sharded under FSDP; the
  gradient scaler under fp16; every process's RNG states, loaded back with
  ``torch.load(weights_only=True)`` and a short allow-list of numpy types), and the scheduler;
- ``trainer_state.json``: the step, the data position, the metric sums not yet logged, the
  cumulative token count and the precomputed-reference cache keys.

Under FSDP, ``save_state`` also writes the sharded model into ``state/`` (and ``load_state``
reads it), so a checkpoint holds the model twice: gathered for ``from_pretrained``, sharded for
resuming.

A checkpoint is written into a temporary sibling, sealed with ``manifest.json`` (every file's
size and sha256, written last) and renamed into place. ``--resume`` takes the newest checkpoint
that matches its manifest, naming each newer one it skips as damaged; a named checkpoint that
does not match is refused. Files that ``torch.load(weights_only=True)`` refuses, or cannot read,
are named in one line. The data order is a function of the
seed and the epoch, so the data position is the number of optimizer steps taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .checkpoint import (
    removed_on_failure,
    replace_dir,
    temporary_sibling,
    write_json,
    write_model,
)
from .manifest import MANIFEST, verify
from .rundir import CHECKPOINTS

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
SCHEDULER = "scheduler.pt"
ROLLOUTS = "rollouts"  # on-policy: a round being reused, one file per process
FORMAT = 1
# Options that may change when a run is resumed: they do not change what is trained.
MAY_CHANGE_ON_RESUME = {
    "resume",
    "overwrite",
    "output_dir",
    "save_every",
    "save_minutes",
    "keep_last",
    "eval_every",
    "log_every",
    "on_nonfinite",
    "num_processes",  # the world size is compared instead
    "data",  # the training data's sha256 is compared instead
    "eval_data",  # evaluation does not change training
    "eval_data_split",
    "data_workers",  # the examples are the same whoever tokenises them
    "data_cache",
    "format",  # the formats that read the data are compared instead (check_same_format)
    "report_to",  # trackers watch the run; a new one starts at the resumed step
    "push_to_hub",
    "hub_private",
    "verbose",
}


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step}"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every complete checkpoint in a run directory, oldest first."""
    root = out / CHECKPOINTS
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = re.fullmatch(r"step-(\d+)", path.name)
            if match and (path / TRAINER_STATE).is_file() and (path / STATE_DIR).is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``step-N`` directory, complete or not, oldest first: what
    ``--resume`` verifies (one that lost its trainer_state.json is damaged, not invisible)."""
    root = out / CHECKPOINTS
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = re.fullmatch(r"step-(\d+)", path.name)
            if match and path.is_dir() and not path.is_symlink():
                found.append((int(match.group(1)), path))
    return sorted(found)


def remove_partial_checkpoints(out: Path) -> None:
    """Clean up after a killed process: delete half-written checkpoints and half-deleted old
    ones; finish a replacement cut between its two renames (``replace_dir``)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return
    for old in root.glob(".*.old"):
        target = root / old.name[1 : -len(".old")]
        tmp = root / f".{target.name}.tmp"
        if not target.exists() and tmp.is_dir():  # tmp was complete: only the rename is left
            os.replace(tmp, target)
    for path in root.iterdir():
        if path.name.startswith(".") and path.name.endswith((".tmp", ".old", ".trash")):
            shutil.rmtree(path, ignore_errors=True)


def _delete(path: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a half one looking complete."""
    trash = path.with_name(f".{path.name}.trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_old_checkpoints(out: Path, keep_last: int | None, newest: Path) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (all when None), ``newest`` (the
    one just written) always among them."""
    if keep_last:
        for _step, path in complete_checkpoints(out)[:-keep_last]:
            if path != newest:
                _delete(path)


def set_aside_later_checkpoints(out: Path, step: int) -> list[Path]:
    """Resuming from ``step`` abandons what the interrupted run did after it: its later
    checkpoints are renamed ``abandoned-step-N`` (kept, but never resumed from)."""
    moved = []
    for later, path in checkpoint_dirs(out):
        if later > step:
            target, number = path.with_name(f"abandoned-{path.name}"), 1
            while target.exists():  # abandoned before: both are kept
                number += 1
                target = path.with_name(f"abandoned-{path.name}-{number}")
            os.replace(path, target)
            moved.append(target)
    return moved


# -- writing ----------------------------------------------------------------------------------
def attach(accelerator: Any) -> None:
    """Let ``save_state``/``load_state`` handle optimizer, scaler and RNG states but not the
    model weights, which the checkpoint already holds as a model directory. (Under FSDP,
    Accelerate saves and loads the sharded model before these hooks run, all the same.)"""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def save_checkpoint(
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    scheduler: Any,
    target: Path,
    trainer_state: dict[str, Any],
    rollouts: Any = None,
) -> None:
    """Write a checkpoint atomically. Every process calls it. ``rollouts``: this process's
    round of on-policy rollouts, when the run stops in the middle of reusing it."""
    tmp = temporary_sibling(target)
    with removed_on_failure(tmp, accelerator.is_main_process):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE_DIR).mkdir(parents=True)
        accelerator.wait_for_everyone()
        write_model(accelerator, model, tokenizer, tmp)
        accelerator.save_state(str(tmp / STATE_DIR), safe_serialization=True)
        if rollouts is not None:
            torch.save(rollouts, tmp / STATE_DIR / f"{ROLLOUTS}_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()  # every process's RNG file is in place
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / STATE_DIR / SCHEDULER)
            write_json(tmp / TRAINER_STATE, {"format": FORMAT, **trainer_state})
            replace_dir(tmp, target)  # sealed with its manifest, the last file written
    accelerator.wait_for_everyone()


def read_rollouts(checkpoint: Path, process_index: int) -> Any:
    """The round of rollouts a checkpoint holds for this process, or None (tensors, lists and
    strings only: loaded with ``weights_only=True``)."""
    path = checkpoint / STATE_DIR / f"{ROLLOUTS}_{process_index}.pt"
    if not path.exists():
        return None
    with refusing_code(path):
        return torch.load(path, weights_only=True, map_location="cpu")


@contextlib.contextmanager
def refusing_code(path: Path) -> Iterator[None]:
    """A file that ``torch.load(weights_only=True)`` refuses (its pickle would run code) or
    cannot read is one clear error naming it, not a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except pickle.UnpicklingError:
        raise refused(path) from None
    except Exception as exc:  # safetensors', zip's, pickle's errors: all say damage
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load {path}: {reason}; the file is damaged") from None


def refused(path: Path) -> ConfigError:
    """The error for a pickled file that ``torch.load(weights_only=True)`` would not load."""
    return ConfigError(
        f"refused to load {path}: it holds code, not tensors (align loads tensors only, with "
        "torch.load(weights_only=True))"
    )


# -- elastic restarts (torchrun --max-restarts) --------------------------------------------------
def elastic_job() -> dict[str, str] | None:
    """The torchrun job this process belongs to, when that job restarts failed workers
    (``--max-restarts`` > 0), None otherwise. What tells one invocation of torchrun from every
    other: the log directory its agent created for it (``mkdtemp``, in
    ``TORCHELASTIC_ERROR_FILE``), on this host; else the agent's process (it outlives its
    workers) and the rendezvous id."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) < 1:
        return None
    import socket

    host = socket.gethostname()
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    if "/attempt_" in error_file:
        return {"host": host, "logs": error_file.rsplit("/attempt_", 1)[0]}
    return {
        "host": host,
        "agent": str(os.getppid()),
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
    }


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def check_elastic(cfg: Any) -> None:
    """``torchrun --max-restarts`` restarts failed workers, which continue the run from its
    newest checkpoint: they need the run's directory and checkpoints, and one node (torchrun
    restarts the workers of healthy nodes without counting it as a restart, so the nodes'
    counts, and the attempts they join, can differ)."""
    if elastic_job() is None:
        return
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "torchrun --max-restarts with several nodes: align continues a run after a restart "
            "on one node only (a healthy node's workers are restarted without counting it, so "
            "the nodes would disagree on the attempt); use --max-restarts 0 and --resume"
        )
    if not cfg.output_dir or cfg.save_every == 0:
        raise ConfigError(
            "torchrun --max-restarts restarts failed workers, which then continue the run from "
            "its newest checkpoint: give --output-dir, and leave checkpoints on (not "
            "--save-every 0)"
        )


def restarted_run(out: Path, record: dict[str, Any] | None) -> tuple[Path | None, list[str]] | None:
    """When torchrun restarted the workers of the job that started the run in ``out``
    (``record``, its run.json): ``(checkpoint, notes)``, its newest intact checkpoint to resume
    from (None when the run failed before its first one and starts over) and the damaged ones
    skipped. None when this is no such restart (a first attempt, or a run another job started:
    the usual rules apply)."""
    job = elastic_job()
    if job is None or restart_count() == 0 or record is None or record.get("elastic") != job:
        return None
    _refuse_completed(out, record)
    remove_partial_checkpoints(out)
    found = checkpoint_dirs(out)
    if not found:
        return None, []
    return _newest_intact(out, found)


# -- finding and checking ---------------------------------------------------------------------
def run_dir_of(resume: str, output_dir: str | None) -> Path:
    """The run directory ``--resume`` continues (nothing is read or changed in it yet)."""
    if resume == "latest":
        if not output_dir:
            raise ConfigError(
                "--resume needs --output-dir, the run to continue (or give --resume "
                "RUN_DIR/checkpoints/step-N)"
            )
        return Path(output_dir)
    checkpoint = Path(resume)
    if not re.fullmatch(r"step-\d+", checkpoint.name):
        raise ConfigError(
            f"--resume {checkpoint}: expected a checkpoint directory named step-N (checkpoints "
            "set aside as abandoned-step-N are not resumed from)"
        )
    out = checkpoint.resolve().parent.parent
    if checkpoint.resolve().parent.name != CHECKPOINTS or not (out / "run.json").is_file():
        raise ConfigError(f"--resume {checkpoint}: not inside a run directory's {CHECKPOINTS}/")
    if output_dir and Path(output_dir).resolve() != out:
        raise ConfigError(
            f"--resume {checkpoint} belongs to the run in {out}, not --output-dir {output_dir}"
        )
    return out


def find_checkpoint(
    resume: str, out: Path, record: dict[str, Any] | None
) -> tuple[Path, list[str]]:
    """The checkpoint ``--resume`` continues the run in ``out`` from (``record``: its run.json),
    verified against its manifest, and what was skipped: ``latest`` is the newest checkpoint
    that verifies (each damaged one newer than it is named with the reason); a named one that
    does not verify is refused. Called holding the directory's lock: half-written checkpoints
    are deleted."""
    if record is None:
        raise ConfigError(f"--resume: {out} holds no run (no run.json)")
    _refuse_completed(out, record)  # first: it may have finished without a checkpoint
    remove_partial_checkpoints(out)
    if resume == "latest":
        found = checkpoint_dirs(out)
        if not found:
            raise ConfigError(
                f"--resume: {out / CHECKPOINTS} holds no complete checkpoint (they are written "
                "every 10 minutes of training by default, --save-minutes or --save-every N, and "
                "on SIGINT/SIGTERM); start again with --overwrite"
            )
        checkpoint, notes = _newest_intact(out, found)
        return checkpoint, notes
    checkpoint = Path(resume)
    if not checkpoint.is_dir():
        raise ConfigError(
            f"--resume {checkpoint}: not a complete checkpoint (no such directory; a complete "
            f"one holds {TRAINER_STATE}, {STATE_DIR}/ and {MANIFEST})"
        )
    problems = verify(checkpoint)
    if problems:
        raise ConfigError(
            f"--resume {checkpoint}: the checkpoint is damaged: {'; '.join(problems[:4])}"
            f"{_others(problems)}. {_intact_hint(out, checkpoint)}"
        )
    return checkpoint, []


def _newest_intact(out: Path, found: list[tuple[int, Path]]) -> tuple[Path, list[str]]:
    """The newest checkpoint that verifies, and a note for each newer one that does not."""
    notes = []
    for _step, path in reversed(found):
        problems = verify(path)
        if not problems:
            return path, notes
        notes.append(
            f"skipped damaged checkpoint {path.name}: {'; '.join(problems[:4])}{_others(problems)}"
        )
    raise ConfigError(
        f"--resume: no checkpoint in {out / CHECKPOINTS} is intact: "
        + " ".join(n.replace("skipped damaged checkpoint ", "") + "." for n in notes)
        + f" `align verify {out}` lists every file; start again with --overwrite"
    )


def _others(problems: list[str]) -> str:
    return f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""


def _intact_hint(out: Path, damaged: Path) -> str:
    others = [(s, p) for s, p in checkpoint_dirs(out) if p.resolve() != damaged.resolve()]
    try:
        path, _notes = _newest_intact(out, others)
    except ConfigError:
        return f"No checkpoint of the run is intact (`align verify {out}`)"
    return f"The newest intact checkpoint is {path}: --resume {path}"


def _refuse_completed(out: Path, record: dict[str, Any]) -> None:
    if record.get("status") == "completed":
        raise ConfigError(f"--resume: the run in {out} already completed; nothing to resume")


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``, its step and counters checked."""
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}); the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise ConfigError(
            f"{path}: expected a JSON object, got {type(state).__name__}; the checkpoint is damaged"
        )
    if state.get("format") != FORMAT:
        raise ConfigError(
            f"{path}: checkpoint format {state.get('format')!r}, this "
            f"align-core writes format {FORMAT}"
        )
    counts = (("step", int), ("num_tokens", (int, float)), ("num_tokens_computed", (int, float)))
    for key, kind in (*counts, ("skipped_steps", int)):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            raise ConfigError(f"{path}: {key} is {value!r}, not a count; the checkpoint is damaged")
    if not isinstance(state.get("pending_metrics", {}), dict):
        raise ConfigError(f"{path}: pending_metrics is not an object; the checkpoint is damaged")
    return state


def _comparable(key: str, value: Any) -> Any:
    if (
        key in ("model", "ref_model", "teacher")
        and isinstance(value, str)
        and os.path.exists(value)
    ):
        return os.path.realpath(value)
    return value


def _is_default(key: str, value: Any) -> bool:
    """Whether ``value`` is the core option ``key``'s default (False for other keys)."""
    from ..options import TrainConfig

    field = TrainConfig.model_fields.get(key)
    return field is not None and field.get_default(call_default_factory=True) == value


def check_same_run(
    previous: dict[str, Any], config: dict[str, Any], train_sha256: str, num_processes: int
) -> dict[str, list[Any]]:
    """A resumed run must be the run that was interrupted: the same options (but for those
    that do not change training), the same training data bytes and the same number of
    processes. Returns the options that changed and may: ``{key: [old, new]}``."""
    problems, changed = [], {}
    before = previous.get("config", {})
    for key in sorted(set(before) | set(config)):
        old, new = before.get(key), config.get(key)
        if _comparable(key, old) == _comparable(key, new):
            continue
        if key not in before and _is_default(key, new):
            continue  # an option added since the run started, at the value it trained with
        if key in MAY_CHANGE_ON_RESUME:
            if key not in ("resume", "output_dir"):
                changed[key] = [old, new]
        else:
            problems.append(f"{key}: was {old!r}, now {new!r}")
    old = previous.get("data", {}).get("train", {}).get("sha256")
    if old != train_sha256:
        problems.append(f"train data: its content changed (sha256 {old} → {train_sha256})")
    if previous.get("num_processes") != num_processes:
        problems.append(
            f"processes: was {previous.get('num_processes')}, now {num_processes} (the data "
            "order and every process's RNG state depend on it)"
        )
    if problems:
        raise ConfigError(
            "--resume continues the same run, but it differs from the one in the output "
            "directory: " + "; ".join(problems) + ". Start a new run (another --output-dir) "
            "to train differently."
        )
    return changed


def format_names(text: str) -> list[str]:
    """The format names of a data report's ``format`` (``sharegpt (detected from its
    columns), prompt_completion (--format)``)."""
    import re

    return re.findall(r"(?:^|\), )([\w.-]+) \(", text or "")


def check_same_format(previous: dict[str, Any], reports: dict[str, Any]) -> None:
    """A resumed run reads its data in the formats it started with: a format plugin installed
    or removed since could otherwise read the same files another way."""
    for split, report in reports.items():
        old = previous.get("data", {}).get(split, {}).get("format")
        if old and report.format and format_names(old) != format_names(report.format):
            raise ConfigError(
                f"--resume: the {split} data was read as {old}, and now as {report.format} "
                "(a data format plugin installed or removed since?): give --format "
                f"{format_names(old)[0]}, or start a new run (another --output-dir)"
            )


def check_same_engine(previous: dict[str, Any], engine: str) -> None:
    """A checkpoint's ``state/`` is in its engine's format (FSDP's sharded model and optimizer,
    DeepSpeed's checkpoint, DDP's optimizer): continue the run under the same engine."""

    def kind(name: str) -> str:  # the number of nodes may change with the same world size
        return name.split(" on ")[0]

    before = previous.get("engine")
    if before is not None and kind(before) != kind(engine):
        raise ConfigError(
            f"--resume continues the same run, but it trained under {before} and this launch "
            f"runs {engine}: a checkpoint's optimizer state is in its engine's format; launch "
            "it as before (the same Accelerate config)"
        )


def check_reference(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """The precomputed reference log-probs of the training data must be the ones the run
    started with (the eval data may change on resume)."""
    key = ((saved or {}).get("cache_keys") or {}).get("train")
    now = ((current or {}).get("cache_keys") or {}).get("train")
    if key and key != now:
        raise ConfigError(
            "--resume: the precomputed reference log-probs of the training data differ from "
            f"the interrupted run's (cache key {key} → {now}): the reference model's files, "
            "the precision, the torch/transformers versions or align's precomputed-reference "
            "format changed (a run started with an older align must start again)"
        )


def reference_state(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a checkpoint records of the reference: its mode and its cache keys."""
    if info is None:
        return None
    keys = {split: Path(s["cache"]).stem for split, s in info.get("splits", {}).items()}
    return {"mode": info["mode"], "cache_keys": keys or None}


# -- loading ----------------------------------------------------------------------------------
def restore_weights(
    model: Any, checkpoint: Path, trust_remote_code: bool = False, model_class: str = "causal_lm"
) -> None:
    """Load the checkpoint's weights into the model, before ``accelerator.prepare``: the full
    model, or for a PEFT model its trained adapter. Every key must match."""
    from safetensors.torch import load_file

    from ..model.loading import load_pretrained

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        with refusing_code(checkpoint / "adapter_model.safetensors"):
            adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, adapter)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ConfigError(f"{checkpoint}: adapter weights the model lacks: {unexpected[:5]}")
        return
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        with refusing_code(checkpoint / name):
            state.update(load_file(str(checkpoint / name)))
    missing, unexpected = _load_exactly(model, state)
    if missing or unexpected:
        # Saved in another layout than the model holds in memory (transformers converts the
        # experts of mixture-of-experts models when saving): load it as from_pretrained does.
        converted = load_pretrained(
            str(checkpoint), trust_remote_code, model_class, role="checkpoint"
        )
        missing, unexpected = _load_exactly(model, converted.state_dict())
        del converted
    if missing or unexpected:
        raise ConfigError(
            f"{checkpoint}: its weights do not fit the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


def _load_exactly(model: Any, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load ``state``; the keys it lacks (but for tied weights) and those the model lacks."""
    result = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]  # tied: fine
    return missing, list(result.unexpected_keys)


def restore_training_state(accelerator: Any, scheduler: Any, checkpoint: Path) -> None:
    """Optimizer, scaler and RNG states (through Accelerate), and the scheduler."""
    from accelerate.utils import load

    state_dir = checkpoint / STATE_DIR
    rng_file = state_dir / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        raise ConfigError(f"{checkpoint}: no RNG state for process {accelerator.process_index}")
    try:
        with warnings.catch_warnings():  # torch's note on a pickle it then refuses anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            accelerator.load_state(str(state_dir))
    except Exception as exc:  # the file at fault, named: Accelerate's error does not say
        _name_the_state_file(state_dir, exc)
        raise
    with refusing_code(rng_file):
        saved = load(rng_file)  # Accelerate swallows a failure to restore RNG states: check
    restored = torch.equal(saved["torch_manual_seed"], torch.get_rng_state())
    if restored and "torch_cuda_manual_seed" in saved and torch.cuda.is_available():
        now = torch.cuda.get_rng_state_all()
        before = saved["torch_cuda_manual_seed"]
        restored = len(now) == len(before) and all(map(torch.equal, now, before))
    if not restored:
        raise ConfigError(
            f"{rng_file}: the RNG states could not be restored (on GPUs: the same number of "
            "visible GPUs is needed)"
        )
    with refusing_code(state_dir / SCHEDULER):
        saved_schedule = torch.load(state_dir / SCHEDULER, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(saved_schedule)


def _name_the_state_file(state_dir: Path, exc: Exception) -> None:
    """After ``load_state`` failed: load each of its files alone as it does (tensors only)
    and raise the first one's error; or, when each loads, say what failed."""
    from accelerate.utils import load

    for path in sorted(state_dir.rglob("*")):
        if path.is_file() and path.suffix in (".bin", ".pt", ".pkl", ".pth"):
            with refusing_code(path), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                load(path, map_location="cpu")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise ConfigError(f"cannot restore the training state from {state_dir}: {reason}") from None


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the rows a killed run logged after its last checkpoint; return how many."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            dropped += 1
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = temporary_sibling(path)
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped
