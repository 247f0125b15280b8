"""What a loss hook can see of the run in progress."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """The run state handed to ``align_compute_loss`` as ``run``.

    ``accelerator`` reduces across processes (``run.accelerator.reduce``); ``step`` is the number
    of optimizer steps taken so far (0 during the first step); ``training`` is False during eval.
    ``output_dir`` is the run's directory: a file a plugin writes there is the plugin's, not
    among what ``--overwrite`` deletes (run.json's ``owns``).
    """

    config: Any
    accelerator: Any
    tokenizer: Any
    output_dir: Path
    max_steps: int
    step: int = 0
    training: bool = True
