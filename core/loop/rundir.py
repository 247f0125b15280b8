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
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError

RUN_JSON = "run.json"
LOCK = ".align-lock"
WRITTEN_BY = "align-core"
# The entries of a run directory that a run writes (the lock file too).
RUN_ENTRIES = ("run.json", "metrics.jsonl", "final", "checkpoints", "logs", LOCK)
STOPPING_WAIT_ENV = "ALIGN_LOCK_WAIT"  # seconds --resume waits for a stopping run (default 900)


def written_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{WRITTEN_BY} {version('align-core')}"
    except PackageNotFoundError:
        return WRITTEN_BY


def _ours(name: str) -> bool:
    """The lock file, and the probe a run starting here writes to see the directory is
    writable (``.write-test-PID``)."""
    return name == LOCK or name.startswith(".write-test-")


def contents(out: Path, limit: int = 6) -> str:
    """What a directory holds, for an error message: ``notes.txt, data/, … (14 entries)``."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not _ours(p.name))
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} entries)" if len(names) > limit else "")


def is_unused(out: Path) -> bool:
    """A directory align may make a run's: missing, or empty (but for a lock file)."""
    return not out.exists() or all(_ours(p.name) for p in out.iterdir())


def read_record(out: Path) -> dict[str, Any] | None:
    """The run's ``run.json``, None when there is none; refused when align did not write it."""
    path = out / RUN_JSON
    if not path.exists():
        return None
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
    return record


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


def owned_entries(record: dict[str, Any]) -> list[str]:
    """The entries of the directory a run's record says the run wrote (never a path outside
    the directory: names only)."""
    return [n for n in record.get("owns", []) if n in RUN_ENTRIES]


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
                deadline = time.monotonic() + float(os.environ.get(STOPPING_WAIT_ENV, "900"))
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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
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
        if not self.path.exists():
            return None
        if self._try():
            self.release()
            return None
        return self.holder()

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


def describe_holder(holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {pid} on {host}{since}"
