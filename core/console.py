"""Console output that cannot stop a run.

Ctrl-C in ``align run 2>&1 | tee log`` stops ``tee`` too, and every later write to stdout or
stderr fails (Python ignores SIGPIPE, so a closed pipe raises ``BrokenPipeError``); so do
writes to a full disk or a terminal that went away. The run must still save its checkpoint,
record its status and exit with its own status: output that cannot be written is dropped.
No torch here: the command line uses it to report errors.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

# The logger of a run's own lines (align.loop.runlog.RunLog routes them to the console and the
# run's train.log); a module outside the loop logs an internal detail with :func:`detail`.
RUN_LOGGER = "align.run"


class ConsoleStream:
    """A text stream whose ``write`` and ``flush`` never raise; after a failed write it drops
    everything (a closed pipe stays closed)."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.failed = stream is None

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                return self.stream.write(text)
            except (OSError, ValueError):  # ValueError: the stream was closed
                self.failed = True
        return len(text)

    def flush(self) -> None:
        if not self.failed:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.failed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def tolerant(stream: TextIO | None) -> ConsoleStream:
    """``stream`` as a :class:`ConsoleStream` (itself when it already is one)."""
    return stream if isinstance(stream, ConsoleStream) else ConsoleStream(stream)


@contextlib.contextmanager
def tolerant_console() -> Iterator[None]:
    """While active, ``sys.stdout`` and ``sys.stderr`` drop what they cannot write; at exit
    the process :func:`settle` s them."""
    _settle_at_exit()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = tolerant(sys.stdout), tolerant(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def echo(message: str) -> None:
    """Print ``message`` to stderr, or drop it (and :func:`settle`) when that fails."""
    stream = tolerant(sys.stderr)
    print(message, file=stream, flush=True)
    if stream.failed:
        settle()


def detail(message: str) -> None:
    """An internal detail of the run in progress: its ``train.log``, and the console with
    ``--verbose`` (nowhere outside a run)."""
    logging.getLogger(RUN_LOGGER).debug(message)


@functools.cache
def _settle_at_exit() -> None:
    atexit.register(settle)  # atexit runs before Python's own last flush


def settle() -> None:
    """Before exiting: flush stdout and stderr, and point one that cannot be flushed at
    ``os.devnull``. Python flushes them again at exit and, should that fail, exits with status
    120 instead of the run's (the remedy Python's documentation gives for BrokenPipeError)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                fd = stream.fileno()
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, fd)
                finally:
                    os.close(devnull)
                stream.flush()  # what the failed writes left in the buffer goes there
