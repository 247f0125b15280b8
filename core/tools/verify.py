"""``align verify RUN_DIR``: every checkpoint and ``final/`` checked against its manifest.

Nothing is loaded and nothing is changed: each file's size and sha256 are compared with what
the run wrote (``manifest.json``), so a truncated, emptied, missing or altered file is found
without torch. The run's record and lock are read too: whether align wrote the directory, and
whether a run is writing it now.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from ..loop import manifest, rundir
from ..loop.rundir import CHECKPOINTS


def _step(path: Path) -> int:
    return int(re.search(r"step-(\d+)", path.name).group(1))


def model_dirs(out: Path) -> list[Path]:
    """The run's checkpoints (abandoned ones too), oldest first, then ``final/``."""
    root = out / CHECKPOINTS
    found = []
    if root.is_dir():
        found = [p for p in root.iterdir() if re.fullmatch(r"(abandoned-)?step-\d+(-\d+)?", p.name)]
    found.sort(key=lambda p: (_step(p), p.name))
    return found + ([out / "final"] if os.path.lexists(out / "final") else [])


def verify_run(run_dir: str | Path, echo: Callable[[str], None]) -> bool:
    """Print one line for the run and one for each model directory; whether all are intact."""
    out = Path(run_dir)
    record = rundir.read_record(out)
    if record is None:
        raise ConfigError(f"{out} holds no align run (no run.json)")
    echo(f"{out}: {record.get('objective', '?')} run, {_status(out, record)}")
    intact = True
    for directory in model_dirs(out):
        name = directory.relative_to(out).as_posix()
        if directory.is_symlink() or not directory.is_dir():
            intact = False
            echo(f"  {name}: DAMAGED: not a directory")
            continue
        problems = manifest.verify(directory)
        if problems:
            intact = False
            echo(f"  {name}: DAMAGED: {'; '.join(problems)}")
        else:
            echo(f"  {name}: intact ({manifest.describe(directory)})")
    for name in sorted(p.name for p in (out / CHECKPOINTS).glob(".*.tmp")):
        echo(f"  {CHECKPOINTS}/{name}: half-written by a killed run (--resume deletes it)")
    if not model_dirs(out):
        echo("  no checkpoint and no final model yet")
    return intact


def _status(out: Path, record: dict) -> str:
    status = str(record.get("status", "?"))
    lock = rundir.RunLock(out)
    holder = lock.holder_if_held()
    if holder is not None:
        return f"in use now by a run ({rundir.describe_holder(holder)})"
    if status == "running":
        return (
            "status running, but no process holds its lock: it was killed (--resume continues it)"
        )
    return status
