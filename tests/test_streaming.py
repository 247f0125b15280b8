"""--streaming: records tokenised as training reads them, through a seeded shuffle buffer, with
the stream's position in every checkpoint: a resumed run trains on the same batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from align.cli import cli
from align.data.records import Record
from align.data.streaming import shuffled


def _run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def test_the_shuffle_buffer_permutes_the_stream_the_same_way_for_a_seed():
    records = [Record({"n": i}, "s", f"record {i}") for i in range(50)]

    def order(seed, size=8):
        rng = np.random.default_rng(seed)
        return [r.data["n"] for r in shuffled(iter(records), size, rng)]

    assert sorted(order(1)) == list(range(50)) and order(1) == order(1)
    assert order(1) != order(2) and order(1) != list(range(50))
    assert order(1, size=1) == list(range(50))  # a buffer of one keeps the order
    assert max(order(1)[:10]) < 8 + 10  # a record leaves at most `size` places early


def _rows(n):
    rows = [{"prompt": f"What is {i} + {i}? ", "completion": f" {2 * i}."} for i in range(n)]
    rows[5]["completion"] = " long" * 100  # skipped by --truncation skip: counted, no example
    return rows


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_resumed_stream_trains_on_the_batches_the_uninterrupted_run_did(
    objective, tmp_path, model_dir, write_jsonl, monkeypatch, crash_copy
):
    """31 records over 2 micro-batches of 2 a step: the 10 steps cross an epoch of the stream
    (and the second epoch's other shuffle); two tokenising workers; the checkpoint at step 4."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    rows = _rows(31)
    if objective == "dpo":
        rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " no"} for r in rows]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    args = ["--objective", objective, "--model", model_dir, "--data", data, "--streaming"]
    args += ["--shuffle-buffer", 8, "--batch-size", 2, "--grad-accum", 2, "--max-steps", 10]
    args += ["--save-every", 4, "--max-length", 48, "--truncation", "skip", "--lr", "1e-2"]
    args += ["--data-workers", 2, "--log-every", 1]
    if objective == "dpo":
        args += ["--reference", "model"]
    done = _run(*args, "--output-dir", tmp_path / "a")
    assert done.exit_code == 0, done.output
    assert "streaming" in done.output
    streamed = json.loads((tmp_path / "a" / "run.json").read_text())["data"]["train"]
    assert streamed["streaming"] and streamed["records"] >= 31  # read ahead of training
    assert streamed["skipped"]["longer than max_length 48"] >= 1
    crash_copy(tmp_path / "a", tmp_path / "b", checkpoint_step=4, logged_up_to=5)
    state = json.loads(
        (tmp_path / "b" / "checkpoints" / "step-4" / "trainer_state.json").read_text()
    )
    [position] = state["data_position"]["stream"]  # 16 examples; the long record has none
    assert position["epoch"] == 0 and position["taken"] == 16 and position["records"] >= 16
    resumed = _run(*args, "--output-dir", tmp_path / "b", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming at step 4 of 10" in resumed.output

    def rows_of(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    a, b = rows_of("a"), rows_of("b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b, strict=True):
        for key in x.keys() - {"epoch"}:
            assert y[key] == pytest.approx(x[key], abs=1e-6, rel=0), (x["step"], key)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--objective", "sft"], "give --max-steps"),
        (["--max-steps", 2, "--group-by-length"], "drop --group-by-length"),
        (["--max-steps", 2, "--objective", "dpo"], "use --reference model"),
        (["--max-steps", 2, "--objective", "kto", "--reference", "model"], "prepares the whole"),
    ],
)
def test_what_streaming_cannot_do_is_refused_before_the_model_loads(
    extra, message, tmp_path, model_dir, write_jsonl
):
    rows = [{"prompt": "a ", "completion": "b", "chosen": "b", "rejected": "c", "label": True}]
    data = write_jsonl(tmp_path / "train.jsonl", rows * 4)
    result = _run("--model", model_dir, "--data", data, "--streaming", *extra)
    assert result.exit_code == 1
    assert "--streaming: " in result.output and message in result.output


def test_streaming_a_hub_dataset_repository(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "repo"
    repo.mkdir()
    rows = [{"question": f"{i} + 1? ", "answer": f"{i + 1}."} for i in range(10)]
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _run(
        "--model", model_dir, "--data", repo, "--data-columns", "question=prompt,answer=completion",
        "--streaming", "--max-steps", 3, "--batch-size", 4, "--output-dir", tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"data train: streaming {repo} (split train)" in result.output
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.arrow"))
