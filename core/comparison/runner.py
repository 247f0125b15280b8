"""The comparison directory and the runs in it.

``DIR/compare.json`` records the grid, the evaluations and the options every run shares, and
that align wrote it; ``DIR/runs/<cell>/`` is each cell's ordinary run (``align run``'s
directory: resumable, verifiable, loadable); ``DIR/evals/<cell>/`` holds what each model scored
(``results.json``) and its greedy answers (``<set>.jsonl``), ``DIR/evals/start/`` the starting
model's; ``results.md``, ``results.json`` and ``kept-vs-learned.png`` are the comparison.

Cells are claimed with ``flock`` on ``DIR/.claims/<cell>.lock`` for as long as one process
trains and evaluates them, so the same ``align compare … --resume`` started in several
terminals (or as several jobs on a shared disk) shares the grid out, each process taking the
next cell no other holds; the tables are rewritten by each process that finishes, and the one
that finishes last writes them whole. A cell whose run completed is not trained again; one that
was interrupted resumes from its newest checkpoint, and one that failed (or left no checkpoint)
starts again in its own directory, of which align deletes only what its run wrote.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import AlignError, ConfigError
from ..loop.rundir import RUN_JSON, is_unused, read_record, written_by
from .evaluate import EvalSet, EvalSettings, evaluate
from .files import write_json
from .grid import Cell, Grid

PLAN = "compare.json"
RUNS = "runs"
EVALS = "evals"
CLAIMS = ".claims"
RESULTS = "results.json"
START = "start"  # the starting model's evaluation


@dataclass
class Plan:
    """What a comparison is: the grid, the held-out sets (and each one's SHA-256), the eval
    rewards and the shared options (as given), recorded in compare.json and checked on
    --resume."""

    grid: Grid
    evals: list[EvalSet]
    eval_rewards: list[str]
    shared: dict[str, Any]
    settings: EvalSettings
    eval_sha256: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "grid": self.grid.as_dict(),
            "evals": {s.name: s.path for s in self.evals},
            "eval_sha256": self.eval_sha256,
            "eval_rewards": self.eval_rewards,
            "shared": self.shared,
            "evaluation": self.settings.__dict__,
        }


@dataclass
class CellState:
    cell: Cell
    status: str  # completed, failed, interrupted, running elsewhere, not run
    results: dict[str, Any] | None = None
    run: dict[str, Any] = field(default_factory=dict)


def prepare_dir(out: Path, plan: Plan, resume: bool) -> None:
    """Create the comparison directory, or check on --resume that it holds this comparison."""
    record = out / PLAN
    if resume:
        if not record.exists():
            raise ConfigError(
                f"--resume: {out} holds no comparison ({PLAN} is missing); start one without "
                "--resume"
            )
        stored = _read_plan(record)
        wanted = json.loads(json.dumps(plan.as_dict()))
        for key in wanted:
            if stored.get("plan", {}).get(key) != wanted[key]:
                raise ConfigError(
                    f"--resume: {out} was started with other {key} "
                    f"({json.dumps(stored.get('plan', {}).get(key))}; this command gives "
                    f"{json.dumps(wanted[key])}): give the options it was started with, or "
                    "another --output-dir"
                )
        return
    if (out / PLAN).exists():
        raise ConfigError(
            f"{out} holds a comparison already: add --resume to continue it, or choose another "
            "--output-dir"
        )
    if out.exists() and (not out.is_dir() or not is_unused(out)):
        raise ConfigError(
            f"output directory {out} is not empty; align compare writes only into a new or "
            "empty directory (or --resume one of its comparisons)"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        record,
        {
            "written_by": written_by(),
            "started": datetime.now().isoformat(timespec="seconds"),
            "plan": plan.as_dict(),
        },
    )


def _read_plan(path: Path) -> dict[str, Any]:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the comparison's record: {exc}") from None
    if not isinstance(stored, dict) or not str(stored.get("written_by", "")).startswith("align"):
        raise ConfigError(f"{path} was not written by align compare; choose another --output-dir")
    return stored


@contextlib.contextmanager
def claimed(out: Path, name: str) -> Iterator[bool]:
    """Hold the claim on cell ``name`` for the block: True when this process got it, False when
    another process holds it."""
    claims = out / CLAIMS
    claims.mkdir(exist_ok=True)
    fd = os.open(claims / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def run_state(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """A cell's run: its status (None when it has not started) and its record."""
    if not (run_dir / RUN_JSON).exists():
        return None, {}
    record = read_record(run_dir) or {}
    return str(record.get("status") or "running"), record


class Comparison:
    """Trains and evaluates the cells of ``plan`` in ``out``, one after another.

    ``make_spec(cell, run_dir, resume, overwrite)`` resolves a cell's run as ``align run`` (or
    ``align.train``) would; ``train(spec)`` runs it; ``rewards`` are the eval rewards, chosen;
    ``start_model`` is what the cells start from; ``echo`` prints a line."""

    def __init__(
        self,
        out: Path,
        plan: Plan,
        cells: list[Cell],
        make_spec: Callable[[Cell, Path, str | None, bool], Any],
        train: Callable[[Any], Any],
        rewards: list[Any],
        start_model: str,
        config: Any,
        echo: Callable[[str], None],
    ) -> None:
        self.out, self.plan, self.cells = out, plan, cells
        self.make_spec, self.train, self.rewards = make_spec, train, rewards
        self.start_model, self.config, self.echo = start_model, config, echo

    def run_dir(self, cell: Cell) -> Path:
        return self.out / RUNS / cell.name

    def check(self) -> None:
        """Resolve every cell's run before anything trains: a bad option value for one objective
        costs a second, not the runs before it."""
        for cell in self.cells:
            self.make_spec(cell, self.run_dir(cell), None, False)

    def run(self) -> list[CellState]:
        (self.out / RUNS).mkdir(exist_ok=True)
        (self.out / EVALS).mkdir(exist_ok=True)
        self._evaluate_once(START, self.start_model, "the starting model")
        for number, cell in enumerate(self.cells, start=1):
            with claimed(self.out, cell.name) as mine:
                if not mine:
                    self.echo(f"[{number}/{len(self.cells)}] {cell.name}: another process has it")
                    continue
                self._cell(number, cell)
        return self.states()

    def _cell(self, number: int, cell: Cell) -> None:
        run_dir = self.run_dir(cell)
        status, _ = run_state(run_dir)
        head = f"[{number}/{len(self.cells)}] {cell.name}"
        if status != "completed":
            resume, overwrite = self._restart(run_dir, status)
            verb = "resuming" if resume else ("starting again" if overwrite else "training")
            self.echo(f"{head}: {verb} in {run_dir}")
            try:
                self.train(self.make_spec(cell, run_dir, resume, overwrite))
            except AlignError as exc:
                from ..loop.failures import RunFailed
                from ..loop.stopping import RunStopped

                # A run that failed on its own (a non-finite loss, a failed write) is a result
                # of the grid; bad input or a signal stops the comparison.
                signal = getattr(exc, "exit_code", 1) > 128
                if signal and isinstance(exc, RunStopped):  # the run's own hint names its dir
                    what = str(exc).partition(" Resume with")[0]
                    raise RunStopped(
                        f"{head}: {what} Continue the comparison with the same command and "
                        f"--resume (--output-dir {self.out}); from Python, resume=True.",
                        exc.exit_code,
                        exc.run_dir,
                    ) from None
                if signal or not isinstance(exc, RunFailed | RunStopped):
                    raise
                self.echo(f"{head}: failed: {exc}")
                return
        self._evaluate_once(cell.name, str(run_dir), head)

    @staticmethod
    def _restart(run_dir: Path, status: str | None) -> tuple[str | None, bool]:
        """How an unfinished cell starts: resumed from its newest checkpoint, or again."""
        if status is None:
            return None, False
        from ..loop.resume import complete_checkpoints

        if status in ("interrupted", "running") and complete_checkpoints(run_dir):
            return "latest", False
        return None, True

    def _evaluate_once(self, name: str, model: str, label: str) -> None:
        target = self.out / EVALS / name
        settings = json.loads(json.dumps(self.plan.as_dict()))
        existing = _read_results(target / RESULTS)
        if existing is not None and existing.get("plan") == settings:
            return
        if name == START:
            with claimed(self.out, START) as mine:
                if mine:
                    self._evaluate(target, model, label, settings)
            return
        self._evaluate(target, model, label, settings)

    def _evaluate(self, target: Path, model: str, label: str, settings: Any) -> None:
        self.echo(f"{label}: evaluating on {', '.join(s.name for s in self.plan.evals)}")
        target.mkdir(parents=True, exist_ok=True)
        results = evaluate(
            model, self.plan.evals, self.rewards, self.plan.settings, self.config, target
        )
        write_json(target / RESULTS, {"model": model, "plan": settings, "sets": results})
        for name, found in results.items():
            cut, skipped = found["truncated"], found["skipped"]
            if cut or skipped:
                self.echo(
                    f"{label}: {name}: {cut} of {found['examples'] + skipped} records truncated "
                    f"and {skipped} skipped at --max-length {self.plan.settings.max_length} "
                    f"(--truncation {self.plan.settings.truncation})"
                )

    def states(self) -> list[CellState]:
        states = []
        for cell in self.cells:
            status, record = run_state(self.run_dir(cell))
            found = _read_results(self.out / EVALS / cell.name / RESULTS)
            if status is None:
                status = "not run"
            held = status != "completed" and _held(self.out, cell.name)
            states.append(
                CellState(
                    cell,
                    "running elsewhere" if held else status,
                    found["sets"] if found and status == "completed" else None,
                    record,
                )
            )
        return states

    def start_results(self) -> dict[str, Any] | None:
        found = _read_results(self.out / EVALS / START / RESULTS)
        return found["sets"] if found else None


def _held(out: Path, name: str) -> bool:
    with claimed(out, name) as mine:
        return not mine


def _read_results(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and "sets" in found else None
