"""What a run prints, and its log file ``RUN_DIR/train.log``.

A run's lines go through the ``align.run`` logger, at one of three levels:

- :meth:`RunLog.say`: what the user reads (the data report, the banner, warnings about the data
  or the options, evaluations, the summary): the console and ``train.log``;
- :meth:`RunLog.detail` (and :func:`align.console.detail` outside the loop): how the run works
  inside (how log-probs are computed, the attention kernel of packed batches, cache paths,
  timings): ``train.log``, and the console with ``--verbose``;
- :meth:`RunLog.record`: ``train.log`` only (each logged step's metrics, the reason a run
  failed, which the command line prints itself).

Lines before the run directory is taken over (``--overwrite`` clears the old run's files only
once the new one is set up) wait in memory and open the file; a run that fails before it starts
writes none. ``--resume`` appends. The main process alone writes the file.
"""

from __future__ import annotations

import logging
import sys
from logging.handlers import MemoryHandler
from pathlib import Path

from ..console import RUN_LOGGER, tolerant

LOG_FILE = "train.log"
_CONSOLE = "console"  # a record's attribute: False keeps it off the console


class _Console(logging.Handler):
    """The console: stderr as it is when the line is written (a notebook's, a test's), through
    :func:`align.console.tolerant` (a closed pipe must not stop the run)."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, _CONSOLE, True):
            print(self.format(record), file=tolerant(sys.stderr), flush=True)


class _File(logging.FileHandler):
    """``train.log``: a copy of what the run printed. A line that cannot be written (a full
    disk) is dropped without a traceback; the checkpoint or model that cannot be written either
    says so in words."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass


class RunLog:
    """The ``align.run`` logger's handlers for one run; :meth:`close` removes them."""

    def __init__(self, verbose: bool) -> None:
        self.logger = logging.getLogger(RUN_LOGGER)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False  # a notebook's root handlers would print every line twice
        for stale in list(self.logger.handlers):  # a run in this process that never closed
            self.logger.removeHandler(stale)
            stale.close()
        self.console = _Console(logging.DEBUG if verbose else logging.INFO)
        self.pending = MemoryHandler(capacity=sys.maxsize, flushLevel=logging.CRITICAL + 1)
        self.file: _File | None = None
        self.logger.addHandler(self.console)
        self.logger.addHandler(self.pending)

    def say(self, message: str) -> None:
        self.logger.info(message)

    def detail(self, message: str) -> None:
        self.logger.debug(message)

    def record(self, message: str) -> None:
        self.logger.info(message, extra={_CONSOLE: False})

    def mute(self) -> None:
        """Another process than the main one: nothing to print or keep."""
        self.close()
        self.logger.addHandler(logging.NullHandler())

    def open_file(self, path: Path) -> None:
        """Start writing ``path`` (appending), with the lines logged so far."""
        if self.file is not None or self.pending not in self.logger.handlers:
            return
        self.file = _File(path, mode="a", encoding="utf-8")
        self.file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.pending.setTarget(self.file)
        self.pending.flush()
        self.logger.removeHandler(self.pending)
        self.logger.addHandler(self.file)

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()
        self.file = None
