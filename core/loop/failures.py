"""A run that fails says why in one line, and its run.json says so too.

A full disk surfaces as whatever the writing library makes of ENOSPC: ``OSError: [Errno 28]``
from Python, ``RuntimeError: basic_ios::clear: iostream error`` from torch's C++ writer, a
``SafetensorError`` from safetensors. :func:`write_failure` tells a full disk by the error's
errno or text, or by the free space left where it was writing, and names the disk.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import AlignError
from .manifest import human_bytes

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# How the error texts say it, spaces removed ("StorageFull": safetensors' Rust error kind).
_FULL_TEXT = ("nospaceleftondevice", "diskquotaexceeded", "storagefull")
# A write that failed with less than this free beside it failed for want of space.
_NEARLY_FULL = 1 << 20


class RunFailed(AlignError):
    """The run cannot go on; its message is the whole story, in one line."""


def is_disk_full(exc: BaseException, path: Path, needs: int | None = None) -> bool:
    """Whether writing ``needs`` bytes under ``path`` failed for want of space: the error says
    so (errno, or the words of safetensors' Rust error), or less than that is free now, after
    the failed write's temporary files were removed (torch's C++ writer reports a full disk as
    ``iostream error`` or ``unexpected pos``)."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    if any(text in str(exc).lower().replace(" ", "") for text in _FULL_TEXT):
        return True
    free = free_bytes(path)
    return free is not None and free < max(needs or 0, _NEARLY_FULL)


def free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def disk_of(path: Path) -> str:
    """The disk a path is on, as ``/dev/sdb1 (mounted at /data)`` or ``tmpfs at /mnt/x``."""
    path = Path(os.path.realpath(path))
    mount = next((p for p in (path, *path.parents) if p.exists() and os.path.ismount(p)), path)
    try:
        with open("/proc/mounts", encoding="utf-8") as handle:
            for line in handle:
                device, point = line.split()[:2]
                if point == str(mount):
                    return (
                        f"{device} (mounted at {mount})"
                        if device.startswith("/")
                        else (f"{device} at {mount}")
                    )
    except OSError:
        pass
    return f"the disk mounted at {mount}"


def write_failure(
    exc: BaseException, what: str, path: Path, needs: int | None, intact: Path | None
) -> RunFailed:
    """The one line for a write of ``what`` (under ``path``) that raised ``exc``: a full disk
    in words, with the space needed (``needs`` bytes, estimated), the checkpoint still intact
    and what to do."""
    if intact is not None:
        then = f"checkpoint {intact.name} is intact; {{}} --resume"
    else:
        then = "no checkpoint to resume from; {} run again"
    if is_disk_full(exc, path, needs):
        need = f" (needs ~{human_bytes(needs)})" if needs else ""
        return RunFailed(
            f"no space left on {disk_of(path)} writing {what}{need}; "
            + then.format("free space and")
        )
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return RunFailed(f"writing {what} failed: {reason}; " + then.format("fix that and"))
