"""Experiment trackers (``--report-to``): Accelerate's, one tracker run per align run.

Each tracker chosen gets the rows of ``metrics.jsonl`` (training and evaluation, at the same
steps and under the same names), the resolved config with the versions of align, its plugins and
the libraries (flattened: ``lr``, ``dpo.beta``, ``versions.align-core``), and is named after
the run directory. A resumed run continues the same tracker run: ``run.json`` keeps each
tracker's identity (``trackers``) and the resumed run passes it back: wandb's run id
(``resume="allow"``), MLflow's run id, Trackio's project and run name (``resume="allow"``),
TensorBoard's directory (``logs/``, with a session-start event at the resumed step, which makes
TensorBoard drop what a killed run logged after its checkpoint). Only the main process starts
trackers and logs to them (as Accelerate does).

A run killed after its last checkpoint logged steps the resumed run logs again (with the same
values: a resumed run equals the uninterrupted one). TensorBoard shows each step once; wandb
(whose charts run on align's step, ``train/global_step``), MLflow and Trackio keep both rows of
each repeated step.

Where a tracker keeps its data is its own setting, as with TRL: ``WANDB_DIR`` / ``WANDB_MODE``
/ ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``, ``TRACKIO_DIR`` /
``TRACKIO_PROJECT``; the project (experiment) is ``align`` unless those say otherwise. Without
``WANDB_DIR``, wandb's local files go to the run directory's ``wandb/``, not to ``./wandb``
wherever align was started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

from ..console import RUN_LOGGER
from ..errors import AlignError, ConfigError
from ..options import TRACKERS

WANDB_STEP = "train/global_step"  # the x-axis of wandb's charts, as HF Trainer logs it
PROJECT = "align"  # wandb's project, MLflow's experiment and Trackio's project, by default
LOGS = "logs"  # TensorBoard's directory in the run directory
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class TrackerError(AlignError):
    """A tracker that could not start (a store it cannot reach, a missing login)."""


def chosen(report_to: list[str]) -> list[str]:
    """The trackers ``report_to`` names: ``all`` is every one installed, ``none`` none."""
    if report_to == ["none"]:
        return []
    if "all" in report_to:
        return [name for name in TRACKERS if importlib.util.find_spec(MODULES[name])]
    return list(report_to)


def check_available(names: list[str], where: str = "--report-to") -> None:
    """Every tracker's package installed, and MLflow with a store it can write: before the
    model is loaded, so a missing package costs seconds, not a run."""
    for name in names:
        if importlib.util.find_spec(MODULES[name]) is None:
            install = "tensorboard" if name == "tensorboard" else f"'align-core[{name}]'"
            raise ConfigError(
                f"{where} {name}: the {MODULES[name]} package is not installed: "
                f"pip install {install}"
            )
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        uri = mlflow.get_tracking_uri()
        if uri.startswith("sqlite:") and importlib.util.find_spec("sqlalchemy") is None:
            raise ConfigError(
                f"{where} mlflow: MLFLOW_TRACKING_URI is not set and MLflow's default store "
                f"({uri}) needs the full mlflow package (sqlalchemy): set MLFLOW_TRACKING_URI "
                "to your tracking server (http://…), or pip install mlflow"
            )


def tracked_config(
    config: dict[str, Any], requirements: list[str], versions: dict[str, str]
) -> dict[str, Any]:
    """The run's resolved config flattened (``dpo.beta``), with ``versions.<name>`` of align,
    every plugin distribution (``requirements``: ``name==version``) and the libraries."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value

    walk("", config)
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        flat[f"versions.{name}"] = version
    flat.update({f"versions.{name}": version for name, version in versions.items()})
    return flat


def build(
    names: list[str], out: Path, previous: dict[str, Any] | None, config: dict[str, Any]
) -> list[Any]:
    """One Accelerate tracker per name, not started (:func:`start` does it, on the main
    process); ``previous``: the ``trackers`` record of the run being resumed."""
    previous = previous or {}
    run_name = out.name
    trackers: list[Any] = []
    for name in names:
        before = previous.get(name) or {}
        if name == "tensorboard":
            trackers.append(TensorBoard(LOGS, out, config=config))
        elif name == "wandb":
            project = before.get("project") or os.environ.get("WANDB_PROJECT") or PROJECT
            resumed = {"id": before["id"], "resume": "allow"} if before.get("id") else {}
            if not os.environ.get("WANDB_DIR"):  # wandb's default: ./wandb, wherever align runs
                resumed["dir"] = str(out)  # inside the run's directory instead
            trackers.append(WandB(project, config=config, name=run_name, **resumed))
        elif name == "mlflow":
            experiment = (
                before.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            )
            trackers.append(
                MLflow(
                    experiment_name=experiment,
                    run_name=run_name,
                    run_id=before.get("run_id"),
                    config=config,
                )
            )
        elif name == "trackio":
            project = before.get("project") or os.environ.get("TRACKIO_PROJECT") or PROJECT
            name_before = before.get("name") or run_name
            trackers.append(Trackio(project, name=name_before, resume="allow", config=config))
        else:  # the options' validator knows the same names
            raise AssertionError(name)
    return trackers


def start(accelerator: Any, first_step: int) -> dict[str, dict[str, Any]]:
    """Start the accelerator's trackers (with their config); return what ``run.json`` keeps of
    each to continue the same tracker run on a resume (empty on other processes)."""
    for tracker in accelerator.log_with:
        tracker.first_step = first_step
    accelerator.init_trackers(PROJECT)  # the trackers are built: they have their names
    if not accelerator.is_main_process:
        return {}
    return {tracker.name: tracker.identity() for tracker in accelerator.trackers}


def _scalar(value: Any) -> Any:
    return value if isinstance(value, bool | int | float | str) else json.dumps(value)


class _Started:
    """A tracker that says which tracker could not start. Accelerate starts, logs to and
    finishes trackers on the main process only (``Accelerator.init_trackers`` and ``log`` do
    nothing on the others), so these methods run there."""

    name: str
    first_step = 1
    started = False

    def start(self) -> None:
        try:
            super().start()  # type: ignore[misc]
        except Exception as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise TrackerError(
                f"--report-to {self.name}: the tracker did not start: {message}"
            ) from exc
        self.started = True

    def finish(self) -> None:
        """Finish the tracker run (one that never started: nothing to do). A tracker that fails
        to finish (its server gone) is said, not raised: the model is saved by then, and the
        run, and its other trackers, finish all the same."""
        if not self.started:  # a run failing as one of its trackers starts finishes the others
            return
        try:
            super().finish()  # type: ignore[misc]
        except Exception as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            logging.getLogger(RUN_LOGGER).warning(
                f"Warning: --report-to {self.name}: the tracker did not finish: {message}"
            )


class TensorBoard(_Started, TensorBoardTracker):
    """``logs/`` of the run directory; the config as hparams (scalars, the rest as JSON)."""

    def __init__(self, run_name: str, logging_dir: Path, config: dict[str, Any]) -> None:
        super().__init__(run_name, logging_dir)
        self.config = config

    def start(self) -> None:
        super().start()
        if self.first_step > 1:  # events after the checkpoint (a killed run's) are dropped
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            event = Event(step=self.first_step, session_log=SessionLog(status=SessionLog.START))
            self.writer.file_writer.add_event(event)
        self.store_init_configuration({k: _scalar(v) for k, v in self.config.items()})

    def identity(self) -> dict[str, Any]:
        return {"logging_dir": LOGS}


class WandB(_Started, WandBTracker):
    """wandb's run: its id kept in ``run.json``; quiet unless ``WANDB_QUIET``/``WANDB_SILENT``
    says otherwise (offline, its three lines on where the run is saved remain).

    Rows are plotted against align's step logged as the metric ``train/global_step`` (HF
    Trainer's), not against wandb's own step: wandb drops a row whose own step does not
    increase, and a resumed run logs again the steps a killed run logged after its checkpoint
    (with the same values) and the evaluation owed at a stop step, which wandb then keeps."""

    def __init__(self, project: str, config: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(project, **kwargs)
        self.config = config

    def start(self) -> None:
        if not any(os.environ.get(v) for v in ("WANDB_QUIET", "WANDB_SILENT")):
            import wandb

            self.init_kwargs.setdefault("settings", wandb.Settings(quiet=True))
        super().start()
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric("*", step_metric=WANDB_STEP, step_sync=True)
        self.store_init_configuration(self.config)  # allow_val_change: a resume's new values

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.run.log(values if step is None else {**values, WANDB_STEP: step}, **kwargs)

    def identity(self) -> dict[str, Any]:
        return {"project": self.run.project, "id": self.run.id}


class MLflow(_Started, MLflowTracker):
    """MLflow's run: its id kept in ``run.json``. Its parameters are logged when the run starts
    (MLflow refuses to change a parameter, so a resumed run's changed options are in
    ``run.json``'s ``resumed`` only)."""

    def __init__(self, config: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config

    def start(self) -> None:
        super().start()
        if self.run_id is None:
            self.store_init_configuration(self.config)

    def identity(self) -> dict[str, Any]:
        return {"experiment": self.experiment_name, "run_id": self.active_run.info.run_id}


class Trackio(_Started, TrackioTracker):
    """Trackio's run, resumed by project and name; the config given to ``trackio.init`` (a
    resumed session's replaces the one before). Its own lines on the console (several per
    start and finish) become one: where the run is and how to see it."""

    def start(self) -> None:
        with _quiet():
            super().start()
        from trackio.utils import TRACKIO_DIR

        project = self.run_name
        print(
            f"trackio: run {self.run.name!r} of project {project!r} in {TRACKIO_DIR}; "
            f'`trackio show --project "{project}"` opens its dashboard',
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> None:
        with _quiet():
            super().finish()
        from trackio import context_vars

        run = getattr(self, "run", None)
        if run is not None and context_vars.current_run.get() is run:  # else at exit, aloud
            context_vars.current_run.set(None)

    def identity(self) -> dict[str, Any]:
        return {"project": self.run_name, "name": self.run.name}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Trackio's print() lines, kept off the console."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
