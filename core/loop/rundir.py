"""What align owns in a run directory, and the lock that gives one run a directory at a time.

align writes into a directory it created, or an empty one; a non-empty directory that holds no
align run is refused, whatever the flags say. ``run.json`` records that align wrote it
(``written_by``) and which entries of the directory are the run's (``owns``): ``--overwrite``
deletes those and nothing else, and a ``run.json`` align did not write is refused.

The lock is ``flock`` on ``.align-lock`` in the directory, taken by the run's main process for
the whole run (the other processes write only where it tells them, inside the checkpoint being
saved). The kernel releases it when the process ends, however it ends: a SIGKILLed run needs no
clean-up. The file says who holds it (pid, host, since when) and whether the run is stopping
(a signal came; it is saving its checkpoint): ``--resume`` waits for a stopping run to exit,
and refuses a running one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import stat
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .runlog import LOG_FILE

RUN_JSON = "run.json"
CHECKPOINTS = "checkpoints"
LOCK = ".align-lock"
WRITTEN_BY = "align-core"
# The entries of a run directory that a run writes (the lock file too).
RUN_ENTRIES = ("run.json", "metrics.jsonl", LOG_FILE, "final", "checkpoints", "logs", LOCK)
STOPPING_WAIT_ENV = "ALIGN_LOCK_WAIT"  # seconds --resume waits for a stopping run (default 900)


def written_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{WRITTEN_BY} {version('align-core')}"
    except PackageNotFoundError:
        return WRITTEN_BY


def _ours(path: Path) -> bool:
    """The lock file, or the probe a run starting here writes to see the directory is writable
    (``.write-test-…``): plain files only (a link planted under such a name is not align's)."""
    name = path.name
    return (name == LOCK or name.startswith(".write-test-")) and _plain_file(path)


def _plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def contents(out: Path, limit: int = 6) -> str:
    """What a directory holds, for an error message: ``notes.txt, data/, … (14 entries)``."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not _ours(p))
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} entries)" if len(names) > limit else "")


def is_unused(out: Path) -> bool:
    """A directory align may make a run's: missing, or empty (but for a lock file)."""
    return not out.exists() or all(_ours(p) for p in out.iterdir())


def read_record(out: Path) -> dict[str, Any] | None:
    """The run's ``run.json``, None when there is none; refused when align did not write it."""
    path = out / RUN_JSON
    if not path.exists() and not path.is_symlink():
        return None
    if not _plain_file(path):  # a link, a directory, a FIFO (reading one would hang)
        raise ConfigError(
            f"{path} is not a plain file, so not align's run record; align leaves this "
            "directory alone: choose another --output-dir"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path} cannot be read as align's run record ({exc}); align leaves this directory "
            "alone: choose another --output-dir"
        ) from None
    if not isinstance(record, dict) or not str(record.get("written_by", "")).startswith(WRITTEN_BY):
        raise ConfigError(
            f"{path} was not written by align (it has no written_by: {WRITTEN_BY} entry); align "
            "neither continues nor replaces it, and leaves the directory alone: choose another "
            "--output-dir"
        )
    _check_shape(path, record)
    return record


# The entries of run.json that align reads back, and the types it writes them with.
_SHAPE = {
    "owns": list,
    "config": dict,
    "data": dict,
    "resumed": list,
    "seconds": (int, float),
    "engine": str,
    "status": str,
    "elastic": dict,
    "num_processes": int,
}


def _check_shape(path: Path, record: dict[str, Any]) -> None:
    """A record align wrote has these entries in these types (or lacks them): one edited by
    hand into something else is refused here, not met as a traceback later."""
    for key, kind in _SHAPE.items():
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ConfigError(
                f"{path}: {key!r} is {value!r}, not what align writes there; the record is "
                "damaged (restore it, or choose another --output-dir)"
            )
    if not all(isinstance(name, str) for name in record.get("owns") or []):
        raise ConfigError(f"{path}: 'owns' must list names; the record is damaged")


def check_claimable(out: Path, locked: bool = False) -> None:
    """Refuse, before anything is written there, a path that is not a directory, a non-empty
    directory that holds no align run, or one whose ``run.json`` align did not write. Before
    the lock is taken (``locked`` False), a directory with align's lock file passes: a run may
    be starting there, and the check is made again under the lock."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} exists and is not a directory")
    if (out / RUN_JSON).exists():
        read_record(out)  # align's, or refused
    elif out.is_dir() and not is_unused(out) and (locked or not (out / LOCK).exists()):
        raise ConfigError(
            f"output directory {out} is not empty and holds no align run (it has "
            f"{contents(out)}); align writes only into a new or empty directory, or one of its "
            "own runs: choose another --output-dir"
        )


def owned_entries(out: Path, record: dict[str, Any]) -> list[str]:
    """The entries of the directory that ``--overwrite`` deletes: those the old run's record
    says it wrote (names only, never a path outside the directory). An entry a run writes that
    is there but not listed (a file of the user's named ``metrics.jsonl``, a record whose
    ``owns`` was emptied) is refused: the new run would write into it."""
    owns = [name for name in record.get("owns") or [] if name in RUN_ENTRIES]
    present = [name for name in RUN_ENTRIES if os.path.lexists(out / name)]
    foreign = [name for name in present if name not in owns and name != LOCK]
    if foreign:
        raise ConfigError(
            f"--overwrite: {', '.join(str(out / n) for n in foreign)} "
            f"{'is' if len(foreign) == 1 else 'are'} not listed as the old run's (run.json "
            "'owns'); align neither deletes nor writes into what it did not write: move it, or "
            "choose another --output-dir"
        )
    return owns


class Busy(ConfigError):
    """The directory is locked by a run that is still going."""


class RunLock:
    """``flock`` on the run directory's lock file, held by one process for the whole run."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self.fd: int | None = None
        self.announced = False  # this process wrote itself into the lock file

    def acquire(self, wait_if_stopping: bool = False) -> RunLock:
        """Take the lock, or raise :class:`Busy` naming the run that holds it. With
        ``wait_if_stopping``, a run that is saving its checkpoint after a signal is waited for
        (``--resume`` started at once after a stop: the shell may return before align saved)."""
        waited, deadline, tries = False, None, 0
        while True:
            tries += 1
            if self._try():
                if waited:
                    print(f"{self.path.parent}: the stopping run exited", file=sys.stderr)
                self._write("running")
                self.announced = True
                return self
            holder = self.holder()
            if tries < 5:  # it may be `align verify` looking, for an instant
                time.sleep(0.1)
                continue
            if not (wait_if_stopping and holder.get("state") == "stopping"):
                raise Busy(self._busy_message(holder))
            if deadline is None:
                deadline = time.monotonic() + _stopping_wait()
                print(
                    f"{self.path.parent}: waiting for the run that is saving its checkpoint "
                    f"after a signal ({describe_holder(holder)}) to exit",
                    file=sys.stderr,
                    flush=True,
                )
                waited = True
            if time.monotonic() > deadline:
                raise Busy(self._busy_message(holder))
            time.sleep(0.2)

    def _try(self) -> bool:
        """One attempt; the lock file is the one at the path once held (a file unlinked and
        re-created meanwhile would let two processes each hold a lock of their own)."""
        fd = self._open(os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return self._try()
        self.fd = fd
        return True

    def _open(self, flags: int) -> int:
        """The lock file, never through a link, and only a plain file: a link planted under its
        name would have align write into a file that is not its own."""
        try:
            fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as exc:
            why = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise self._not_a_lock(why) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._not_a_lock("not a plain file")
        return fd

    def _not_a_lock(self, why: str | None) -> ConfigError:
        return ConfigError(
            f"{self.path} cannot be align's lock file ({why}); align writes nowhere near a link "
            "or a file it cannot lock: remove it if it is yours to remove, or choose another "
            "--output-dir"
        )

    def _write(self, state: str) -> None:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now().isoformat(timespec="seconds"),
            "state": state,
        }
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def holder_if_held(self) -> dict[str, Any] | None:
        """Who holds the lock now (None when nobody does); takes it for an instant to know."""
        try:
            fd = self._open(os.O_RDONLY)  # flock needs no write access: verify changes nothing
        except ConfigError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.holder()
        finally:
            os.close(fd)
        return None

    def holder(self) -> dict[str, Any]:
        """What the lock file says of the run holding it ({} when unreadable)."""
        try:
            value = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def stopping(self) -> None:
        """The run got a stop signal and is saving its checkpoint: a ``--resume`` may wait."""
        if self.fd is not None:
            with contextlib.suppress(OSError):  # a full disk must not stop the save
                self._write("stopping")

    def release(self, remove: bool = False) -> None:
        """Let go (``remove``: and delete the lock file, for a run that never started, so the
        directory it created is empty again and can be removed)."""
        if self.fd is None:
            return
        if self.announced:
            with contextlib.suppress(OSError):
                self._write("ended")
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd, self.announced = None, False

    def _busy_message(self, holder: dict[str, Any]) -> str:
        out = self.path.parent
        doing = (
            "saving its checkpoint after a stop signal"
            if holder.get("state") == "stopping"
            else "still running"
        )
        return (
            f"{out} is in use by another align run, {doing} ({describe_holder(holder)}): one run "
            "at a time writes a directory. Wait for it to exit, or stop it first (kill -TERM "
            f"{holder.get('pid', 'PID')} saves a checkpoint), or choose another --output-dir"
        )


def _stopping_wait() -> float:
    text = os.environ.get(STOPPING_WAIT_ENV, "900")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{STOPPING_WAIT_ENV}={text}: expected a number of seconds")
    return seconds


def describe_holder(holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {pid} on {host}{since}"
