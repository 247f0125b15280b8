"""Writing model directories and run files so a reader never sees half of one.

Everything is written into a temporary sibling, sealed with a manifest of every file's size and
sha256 (:mod:`.manifest`), flushed to disk and renamed into place: a process killed at any
moment leaves either the previous directory or the new one, complete. A write that fails (a
full disk) removes its temporary sibling.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..model.dropout import configs_as_given
from ..reference.models import REFERENCE_ADAPTER
from .manifest import write_manifest


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``path`` whole or not at all: a new temporary file (never through a link left
    under its name), flushed, renamed over it; removed again if the write fails."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def temporary_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def write_model(accelerator: Any, model: Any, tokenizer: Any, directory: Path) -> None:
    """Model weights (safetensors; the adapter only for a PEFT model) and tokenizer into an
    existing directory. Every process calls it (FSDP gathers the weights); the main one writes.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        state_dict = _without_aliases(unwrapped, state_dict)
        adapters = {}
        if hasattr(unwrapped, "peft_config"):  # adapter-only, without the frozen reference one
            names = [n for n in unwrapped.peft_config if n != REFERENCE_ADAPTER]
            adapters = {"selected_adapters": names}
        with configs_as_given(unwrapped):  # the user's dropout values, not the run's zeros
            unwrapped.save_pretrained(
                directory, state_dict=state_dict, safe_serialization=True, **adapters
            )
        tokenizer.save_pretrained(directory)


def _without_aliases(model: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the names under which a tied weight appears a second time (``lm_head.weight`` of a
    model that ties it to the input embeddings): the names that share their tensor with
    another and are not the one ``named_parameters`` gives it. ``save_pretrained`` recognises
    them by their shared storage, but the gathered state dict of FSDP or DeepSpeed holds a
    separate copy under each name."""
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    owned = {name for name, _ in model.named_parameters()}
    aliases = {
        name for group in names.values() if len(group) > 1 for name in group if name not in owned
    }
    return {name: value for name, value in state_dict.items() if name not in aliases}


def save_model_dir(
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    target: Path,
    state: dict[str, Any] | None = None,
    before_seal: Callable[[Path], None] | None = None,
) -> None:
    """Save model and tokenizer to ``target`` atomically; every process calls it.
    ``before_seal`` (the main process's) adds files to the directory before its manifest is
    written: the model card."""
    tmp = temporary_sibling(target)
    with removed_on_failure(tmp, accelerator.is_main_process):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        write_model(accelerator, model, tokenizer, tmp)
        if accelerator.is_main_process:
            if state is not None:
                write_json(tmp / "trainer_state.json", state)
            if before_seal is not None:
                before_seal(tmp)
            replace_dir(tmp, target)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def removed_on_failure(tmp: Path, main_process: bool) -> Iterator[None]:
    """A temporary directory whose writing failed (a full disk, say) is removed at once: it
    would hold the space the user needs to free, and never be resumed from."""
    try:
        yield
    except BaseException:
        if main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def sync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _sync_dir(Path(root))


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def honour_umask(path: Path) -> None:
    """Give every file under ``path`` the mode a new file there gets (by the umask, or the
    directory's default ACL). safetensors writes weights through a temporary file, mode 0600,
    and on a shared cluster others read the models."""
    probe = path / ".mode-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            st = os.lstat(file)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(file, mode)


def replace_dir(tmp: Path, target: Path) -> None:
    """Seal a finished directory with its manifest and move it into place, replacing
    ``target`` if it exists."""
    honour_umask(tmp)
    write_manifest(tmp)
    sync_tree(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _sync_dir(target.parent)
