"""Files of a comparison directory, written whole or not at all.

Several processes may share a comparison (``align compare … --resume`` in several terminals),
and each rewrites the tables and the plot when it finishes: every write goes to a temporary
sibling of a name no other writer uses (this process's id and a random part), renamed into
place, so two writers at once leave one whole file and never rename each other's half.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary sibling of ``path``, renamed over ``path`` once whole;
    removed again if writing fails. The sibling keeps ``path``'s suffix (matplotlib reads the
    format from it)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
