"""--report-to: TensorBoard, wandb (offline), MLflow (a file store) and Trackio (its local
SQLite store) each get metrics.jsonl's rows at the same steps, the resolved config and the
versions; one tracker run per align run, which a resumed run continues; `none` writes nothing.
Everything stays on this machine: wandb is offline and the stores are under tmp_path."""

import json
import signal
import struct
import sys

import pytest
from click.testing import CliRunner

from align.cli import cli
from align.errors import ConfigError
from align.loop import trackers
from align.loop.resume import complete_checkpoints
from align.loop.stopping import StopSignals

ALL = "tensorboard,wandb,mlflow,trackio"


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """Every tracker's store under tmp_path, nothing sent anywhere."""
    dirs = {name: tmp_path / name for name in ("wandb", "mlruns", "trackio")}
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(dirs["wandb"]))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "60")
    for name in ("WANDB_PROJECT", "WANDB_QUIET", "WANDB_SILENT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dirs["mlruns"].as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("TRACKIO_DIR", str(dirs["trackio"]))
    import trackio  # noqa: F401  (its modules read TRACKIO_DIR once, when imported)

    for module in [m for n, m in sys.modules.items() if n.startswith("trackio")]:
        if hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", dirs["trackio"])
    for path in dirs.values():
        path.mkdir()
    yield dirs
    import wandb

    wandb.teardown()  # its settings (WANDB_DIR) are read once per wandb session


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def _args(tmp_path, model_dir, write_jsonl, sft_rows, *more):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows)
    eval_data = write_jsonl(tmp_path / "eval.jsonl", sft_rows[:2])
    return [
        "--model", model_dir, "--data", data, "--eval-data", eval_data, "--eval-every", "2",
        "--batch-size", "2", "--lr", "1e-2", *more,
    ]  # fmt: skip


def _expected(out):
    """metrics.jsonl as {(step, name): value}."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in rows for k, v in r.items() if k != "step"}


def _assert_same(got, expected, rel=1e-6):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-9), key


# -- reading each store back ----------------------------------------------------------------------
def _tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    tags = events.Tags()["scalars"]
    found = [(e.step, tag, e.value) for tag in tags for e in events.Scalars(tag)]
    shown = {(step, tag): value for step, tag, value in found}
    assert len(shown) == len(found), "a step shown twice"
    return shown


def _tensorboard_hparams(out):
    """The hparams of the newest session (Accelerate's TensorBoard tracker writes them with
    torch's ``add_hparams``, into a directory of their own under logs/)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for events in sorted((out / "logs").glob("*/events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    content = value.metadata.plugin_data.content
                    info = plugin_data_pb2.HParamsPluginData.FromString(content)
                    hparams = info.session_start_info.hparams
                    found = {k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()}
    return found


def _wandb_records(path):
    """The records of a wandb transaction log (``run-ID.wandb``): LevelDB's log format, in
    32 KiB blocks of chunks (crc32, length, type) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # the rest of the block is padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb(wandb_dir):
    """{run id: (metrics {(step, name): value}, config {key: value}, sessions)}."""
    runs = {}
    for log in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                metrics, config, sessions = runs.setdefault(run_id, ({}, {}, []))
                sessions.append(record.run.display_name)
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                step = items.pop(trackers.WANDB_STEP)  # align's step: the charts' x-axis
                metrics.update({(step, k): v for k, v in items.items() if not k.startswith("_")})
    return runs


def _mlflow(run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    metrics = {
        (m.step, name): m.value
        for name in run.data.metrics
        for m in client.get_metric_history(run_id, name)
    }
    return run, metrics


def _trackio(trackio_dir, project="align"):
    import sqlite3

    with sqlite3.connect(trackio_dir / f"{project}.db") as db:
        rows = db.execute("select run_id, run_name, step, metrics from metrics").fetchall()
        configs = db.execute("select run_id, config from configs").fetchall()
    metrics = {(step, k): v for _, _, step, m in rows for k, v in json.loads(m).items()}
    runs = {(run_id, name) for run_id, name, _, _ in rows}
    return runs, metrics, {run_id: json.loads(c) for run_id, c in configs}


# -- the tests ------------------------------------------------------------------------------------
def test_every_tracker_gets_the_metrics_the_config_and_the_versions(
    stores, tmp_path, model_dir, write_jsonl, sft_rows
):
    out = tmp_path / "run"
    args = _args(tmp_path, model_dir, write_jsonl, sft_rows, "--max-steps", "3")
    result = _run(*args, "--report-to", ALL, "--output-dir", out)
    expected = _expected(out)
    assert {name for _, name in expected} >= {"loss", "learning_rate", "eval_loss", "grad_norm"}
    assert {step for step, _ in expected} == {1, 2, 3}
    info = json.loads((out / "run.json").read_text())
    assert set(info["trackers"]) == {"tensorboard", "wandb", "mlflow", "trackio"}
    versions = {r.split("==")[0]: r.split("==")[1] for r in info["requirements"]}

    _assert_same(_tensorboard(out), expected)
    hparams = _tensorboard_hparams(out)
    assert hparams["lr"] == 0.01 and hparams["objective"] == "sft"
    assert hparams["versions.align-core"] == versions["align-core"]
    assert hparams["versions.torch"] == info["versions"]["torch"]

    (wandb_run,) = _wandb(stores["wandb"]).items()
    run_id, (metrics, config, sessions) = wandb_run
    assert run_id == info["trackers"]["wandb"]["id"] and sessions == ["run"]
    _assert_same(metrics, expected)
    assert config["lr"] == 0.01 and config["sft.normalization"] == "token"
    assert config["versions.align-plugin-sft"] == versions["align-plugin-sft"]

    run, metrics = _mlflow(info["trackers"]["mlflow"]["run_id"])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    _assert_same(metrics, expected)
    assert run.data.params["lr"] == "0.01"
    assert run.data.params["versions.align-core"] == versions["align-core"]

    runs, metrics, configs = _trackio(stores["trackio"])
    assert [name for _, name in runs] == ["run"]
    _assert_same(metrics, expected)
    (config,) = configs.values()
    assert config["max_steps"] == 3 and config["versions.align-core"] == versions["align-core"]

    assert "Run finished. Uploading logs to Trackio" not in result.output  # its noise, kept off
    assert "trackio: run 'run' of project 'align'" in result.output


def test_a_resumed_run_continues_the_same_tracker_runs(
    stores, tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch
):
    """Stopped by a signal after step 2 (its checkpoint written), then resumed to step 4:
    each tracker has one run with every step once."""
    out = tmp_path / "run"
    args = _args(tmp_path, model_dir, write_jsonl, sft_rows, "--max-steps", "4")
    args += ["--report-to", ALL, "--output-dir", out]
    asked = []

    def requested(self, accelerator):
        asked.append(1)
        return signal.SIGTERM if len(asked) == 2 else 0

    with monkeypatch.context() as patch:
        patch.setattr(StopSignals, "requested", requested)
        _run(*args, expect=128 + signal.SIGTERM)
    assert [s for s, _ in complete_checkpoints(out)] == [2]
    first = json.loads((out / "run.json").read_text())["trackers"]
    result = _run(*args, "--resume")
    assert "Resuming at step 2 of 4" in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["trackers"] == first
    expected = _expected(out)
    assert sorted({step for step, _ in expected}) == [1, 2, 3, 4]

    _assert_same(_tensorboard(out), expected)
    runs = _wandb(stores["wandb"])
    assert list(runs) == [first["wandb"]["id"]]  # two offline sessions of one wandb run
    metrics, config, sessions = runs[first["wandb"]["id"]]
    assert sessions == ["run", "run"]
    _assert_same(metrics, expected)
    run, metrics = _mlflow(first["mlflow"]["run_id"])
    _assert_same(metrics, expected)
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient().search_runs([run.info.experiment_id])) == 1
    runs, metrics, configs = _trackio(stores["trackio"])
    assert len(runs) == 1
    _assert_same(metrics, expected)
    (config,) = configs.values()
    assert config["resume"] == "latest"  # the resumed session's config


def test_tensorboard_drops_what_a_killed_run_logged_after_its_checkpoint(
    stores, tmp_path, model_dir, write_jsonl, sft_rows, crash_copy
):
    """A run killed after logging step 3, its checkpoint at step 2: the resumed run logs
    steps 3 and 4 again, and TensorBoard shows each step once, the resumed run's value."""
    args = _args(tmp_path, model_dir, write_jsonl, sft_rows, "--max-steps", "4")
    args += ["--save-every", "2", "--report-to", "tensorboard"]
    _run(*args, "--output-dir", tmp_path / "a")
    crash_copy(tmp_path / "a", tmp_path / "b", checkpoint_step=2, logged_up_to=3)
    before = _tensorboard(tmp_path / "b")
    assert {step for step, _ in before} == {1, 2, 3, 4}  # what the killed run had logged
    _run(*args, "--output-dir", tmp_path / "b", "--resume")
    _assert_same(_tensorboard(tmp_path / "b"), _expected(tmp_path / "b"))


def test_report_to_none_writes_no_tracker_files(stores, tmp_path, model_dir, write_jsonl, sft_rows):
    out = tmp_path / "run"
    args = _args(tmp_path, model_dir, write_jsonl, sft_rows, "--max-steps", "2")
    _run(*args, "--report-to", "none", "--output-dir", out)
    assert not (out / "logs").exists()
    assert "trackers" not in json.loads((out / "run.json").read_text())
    assert all(not any(path.iterdir()) for path in stores.values())
    _run(*args, "--output-dir", tmp_path / "default")  # TensorBoard by default, only it
    assert list((tmp_path / "default" / "logs").glob("events.out.tfevents.*"))
    assert all(not any(path.iterdir()) for path in stores.values())


def test_tracker_names_are_checked(tmp_path, monkeypatch):
    result = _run("--report-to", "tensorbord", expect=1)
    assert "unknown tracker 'tensorbord'. Did you mean 'tensorboard'?" in result.output
    assert "--report-to" in result.output
    assert "give it alone" in _run("--report-to", "wandb,none", expect=1).output
    config = tmp_path / "run.yaml"
    config.write_text("report_to: [wandb, MLflow]\n")
    from align.config import resolve
    from align.plugins import get_registry

    assert resolve(get_registry(), str(config)).config.report_to == ["wandb", "mlflow"]
    config.write_text("report_to: wandb,trackio\n")
    assert resolve(get_registry(), str(config)).config.report_to == ["wandb", "trackio"]

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util,
        "find_spec",
        lambda name: None if name in ("wandb", "sqlalchemy") else real(name),
    )
    with pytest.raises(ConfigError, match=r"pip install 'align-core\[wandb\]'"):
        trackers.check_available(["tensorboard", "wandb"])
    assert trackers.chosen(["all"]) == ["tensorboard", "mlflow", "trackio"]
    assert trackers.chosen(["none"]) == []
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default store: sqlite:///mlflow.db, here
    with pytest.raises(ConfigError, match="set MLFLOW_TRACKING_URI"):
        trackers.check_available(["mlflow"])


def test_a_tracker_that_cannot_start_fails_the_run_in_words(
    stores, tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch
):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # MLflow 3 refuses its file store without it
    out = tmp_path / "run"
    args = _args(tmp_path, model_dir, write_jsonl, sft_rows, "--max-steps", "2")
    result = _run(*args, "--report-to", "tensorboard,mlflow", "--output-dir", out, expect=1)
    assert "--report-to mlflow: the tracker did not start: " in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "did not start" in info["failure"]


def test_a_tracker_that_cannot_finish_leaves_the_run_completed(
    stores, tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch
):
    """The model is saved when the trackers finish: a tracker's failure then is said, and the
    run is still recorded as completed."""

    def gone(self):
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(trackers.TensorBoardTracker, "finish", gone)
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "run"
    result = _run("--model", model_dir, "--data", data, "--max-steps", 1, "--output-dir", out)
    assert "--report-to tensorboard: the tracker did not finish: the tracking server" in (
        result.output
    )
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_without_wandb_dir_wandb_writes_inside_the_run_directory(
    stores, tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch
):
    """wandb's default is ./wandb, wherever align was started; align points it at the run's
    directory, the only place it writes."""
    monkeypatch.delenv("WANDB_DIR")
    started_in = tmp_path / "here"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    out = tmp_path / "run"
    args = _args(tmp_path, model_dir, write_jsonl, sft_rows, "--max-steps", "1")
    _run(*args, "--report-to", "wandb", "--output-dir", out)
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list(started_in.iterdir()) == []
