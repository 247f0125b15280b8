"""A model directory's or checkpoint's manifest: every file's size and sha256, written last.

``manifest.json`` is the last file written into a checkpoint (and ``final/``) before it is
renamed into place, so a directory whose files match their manifest is complete and unchanged
since align wrote it: a truncated, emptied, missing or altered file (a flipped byte in the
weights) is found before anything is loaded. Files are hashed on several threads (``hashlib``
releases the GIL), at roughly the disk's read speed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 22


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_all(root: Path, names: list[str]) -> list[str]:
    workers = min(8, os.cpu_count() or 1, max(len(names), 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda name: sha256_of(root / name), names))


def _files(root: Path) -> list[str]:
    """Every regular file under ``root`` as a POSIX relative path, but the manifest itself."""
    names = []
    for directory, _dirs, files in os.walk(root):
        for name in files:
            relative = (Path(directory) / name).relative_to(root).as_posix()
            if relative != MANIFEST:
                names.append(relative)
    return sorted(names)


def write_manifest(root: Path) -> dict[str, Any]:
    """Hash every file under ``root`` and write ``manifest.json`` (flushed); return it."""
    names = _files(root)
    hashes = _hash_all(root, names)
    files = {
        name: {"size": (root / name).stat().st_size, "sha256": digest}
        for name, digest in zip(names, hashes, strict=True)
    }
    manifest = {"format": FORMAT, "files": files}
    with open(root / MANIFEST, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def manifest_size(root: Path) -> int | None:
    """The bytes a directory's manifest lists (None without a readable manifest)."""
    try:
        files = json.loads((root / MANIFEST).read_text(encoding="utf-8"))["files"]
        return sum(int(entry["size"]) for entry in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None


def verify(root: Path) -> list[str]:
    """What is wrong with the directory against its manifest: one reason per damaged file
    (an empty list when every file is there with its size and sha256)."""
    try:
        text = (root / MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        return [
            f"no {MANIFEST}: it was never completed (or was written by an align-core older than "
            "manifests, 0.1)"
        ]
    except OSError as exc:
        return [f"{MANIFEST} cannot be read: {exc.strerror}"]
    try:
        manifest = json.loads(text)
        files = manifest["files"]
        expected = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return [f"{MANIFEST} is damaged (not the JSON align writes)"]
    problems, present = [], []
    for name, (size, _digest) in expected.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{MANIFEST} names a file outside the directory: {name!r}")
            continue
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        actual = path.stat().st_size
        if actual != size:
            cut = " (truncated)" if actual < size else ""
            problems.append(f"{name} has {actual:,} bytes, {size:,} were written{cut}")
        else:
            present.append(name)
    for name, digest in zip(present, _hash_all(root, present), strict=True):
        if digest != expected[name][1]:
            problems.append(f"{name} changed since it was written (its sha256 differs)")
    for name in _files(root):
        if name not in expected:
            problems.append(f"{name} was not there when it was written (not in the manifest)")
    return problems


def describe(root: Path) -> str:
    """``12 files, 46.1 MB`` from a directory's manifest."""
    size = manifest_size(root) or 0
    count = len(json.loads((root / MANIFEST).read_text(encoding="utf-8"))["files"])
    return f"{count} files, {human_bytes(size)}"


def human_bytes(size: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
