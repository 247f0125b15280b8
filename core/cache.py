"""The user cache directory: the demo model and precomputed reference log-probs live here."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ALIGN_CACHE"


def cache_dir() -> Path:
    """``$ALIGN_CACHE``, or ``~/.cache/align``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "align")
