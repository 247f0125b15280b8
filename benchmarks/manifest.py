"""What sealing and verifying a checkpoint's manifest costs: seconds and GB/s for writing
``manifest.json`` (hashing every file) and for verifying it, against plainly reading the files.

    python benchmarks/manifest.py                  # 2 GB in 5 files, 3 repeats
    python benchmarks/manifest.py --gb 8 --files 9

The files are random bytes written into a temporary directory (``--dir``; default: the system's
temporary directory, which may be memory). Each repeat drops the page cache first when it can
(root on Linux: ``/proc/sys/vm/drop_caches``), so the figures include reading from the disk;
otherwise they are from memory and show the hashing alone. Repeats interleave the three
measurements and the table gives their medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align.loop.manifest import verify, write_manifest  # noqa: E402


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _read_all(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 22):
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="total size in GB (1e9 bytes)")
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        size = int(args.gb * 1e9 / args.files)
        block = os.urandom(1 << 24)
        for index in range(args.files):
            with open(root / f"shard-{index}.bin", "wb") as handle:
                for _ in range(size // len(block)):
                    handle.write(block)
                handle.write(block[: size % len(block)])
        total = sum(p.stat().st_size for p in root.iterdir())
        times: dict[str, list[float]] = {"read": [], "write_manifest": [], "verify": []}
        cold = False
        for _ in range(args.repeats):
            for name, action in (
                ("read", lambda: _read_all(root)),
                ("write_manifest", lambda: write_manifest(root)),
                ("verify", lambda: verify(root)),
            ):
                cold = _drop_caches()
                started = time.perf_counter()
                result = action()
                times[name].append(time.perf_counter() - started)
                if name == "verify":
                    assert result == [], result
        print(
            f"{total / 1e9:.2f} GB in {args.files} files, {os.cpu_count()} CPUs, "
            f"{'page cache dropped before each (from disk)' if cold else 'from memory'}"
        )
        print(f"{'':16}{'seconds':>9}{'GB/s':>8}{'vs read':>9}")
        read = statistics.median(times["read"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:16}{median:9.2f}{total / 1e9 / median:8.2f}{median / read:9.2f}")


if __name__ == "__main__":
    main()
