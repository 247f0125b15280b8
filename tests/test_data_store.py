"""The tokenised-data store: the same examples as tokenising in memory, built once per key (every
input of the key changes it), in parallel with the same result, never half written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pydantic import BaseModel

from align.data import build
from align.data.examples import RecordTokenizer, tokenize_records
from align.data.records import read_records
from align.data.sources import DataSource
from align.data.store import StoredExamples
from align.errors import DataError


class Weight(BaseModel):
    weight: float = 1.0


def _messages(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": c} for r, c in zip(roles, turns, strict=False)]


ROWS = {
    "prompt_completion": [
        {"prompt": "What is 2 + 2? ", "completion": "4.", "weight": 0.5},
        {"messages": _messages("Hi", "Hello!", "Add 1 and 2", "3"), "id": 7},
        {"prompt": _messages("Question?"), "completion": [_messages("", "Answer.")[1]]},
        {"text": "Plain text, every token trained."},
    ],
    "preference": [
        {"prompt": "Capital of France? ", "chosen": "Paris.", "rejected": "Rome."},
        {
            "prompt": _messages("Q"),
            "chosen": [_messages("", "yes")[1]],
            "rejected": [_messages("", "no")[1]],
        },  # noqa: E501
    ],
    "feedback": [
        {"prompt": "Is water wet? ", "completion": "Yes.", "label": True},
        {"prompt": "Sky colour? ", "chosen": "Blue.", "rejected": "Green."},
    ],
    "ranked": [
        {"prompt": "Best? ", "completions": ["a", "bb"], "scores": [1.0, 2.5]},
        {"prompt": "More? ", "completions": ["x", "y", "zzz"], "ranks": [2, 1, 3]},
    ],
    "prompt_only": [
        {"prompt": "Add 3 and 4. "},
        {"prompt": _messages("Add 5 and 6.")},
    ],
}


def _store(tmp_path, tokenizer, path, fmt, fields=None, workers=1, max_length=64):
    tokenise = RecordTokenizer(fmt, tokenizer, max_length, "keep_start", fields)
    store = tmp_path / f"store-{fmt}-{workers}"
    report, used = build.write_store(
        DataSource(str(path)).chunks(), tokenise, store, "train", workers, str(path)
    )
    return StoredExamples(store), report, used


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_stored_examples_equal_the_examples_tokenised_in_memory(
    fmt, tmp_path, tokenizer, write_jsonl
):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS[fmt])
    fields = Weight if fmt == "prompt_completion" else None
    expected, report = tokenize_records(
        read_records(path), fmt, tokenizer, 64, "keep_start", "train", fields
    )
    stored, stored_report, _ = _store(tmp_path, tokenizer, path, fmt, fields)
    got = [{k: v for k, v in e.items() if k != "index"} for e in stored]
    assert got == expected
    assert [e["index"] for e in stored] == list(range(len(expected)))
    assert stored_report.as_dict() == report.as_dict()
    lengths = [sum(len(v) for k, v in e.items() if k.endswith("input_ids")) for e in expected]
    assert stored.lengths().tolist() == lengths
    assert stored[-1] == stored[len(stored) - 1] and stored[:2] == [stored[0], stored[1]]


def _many(n, bad_line=None):
    rows = []
    for i in range(n):
        row = {"prompt": f"Question {i}: what is {i} + {i}? ", "completion": f"{2 * i}."}
        if i + 1 == bad_line:
            row["completion"] = 12
        rows.append(row)
    return rows


def test_workers_build_the_same_store_as_one_process(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "data.jsonl", _many(3 * build.CHUNK + 17))
    one, report_one, _ = _store(tmp_path, tokenizer, path, "prompt_completion", workers=1)
    two, report_two, used = _store(tmp_path, tokenizer, path, "prompt_completion", workers=2)
    assert used == 2
    assert report_one.as_dict() == report_two.as_dict()
    for name in sorted(os.listdir(one.path)):
        if name != "meta.json":  # which says how many workers tokenised
            assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name
    assert {**one.meta, "workers": 2} == two.meta


def test_a_bad_record_stops_every_worker_with_its_file_line_and_field(
    tmp_path, tokenizer, write_jsonl, monkeypatch
):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "data.jsonl", _many(3 * build.CHUNK, bad_line=600))
    tokenise = RecordTokenizer("prompt_completion", tokenizer, 64, "keep_start")
    with pytest.raises(DataError) as caught:
        build.build_cached(
            "k" * 32, DataSource(str(path)).chunks, tokenise, "train", 2, str(path), None, {}
        )
    assert str(caught.value) == f"{path}, line 600, field 'completion': expected a string, got int"
    assert os.listdir(build.stores_dir()) == []  # nothing half written is left


def _spec_and_hooks(model_dir, data, **options):
    from align.config import resolve
    from align.loop.setup import load_tokenizer
    from align.plugins import get_registry
    from align.plugins.hooks import ObjectiveHooks

    registry = get_registry()
    spec = resolve(registry, None, {"model": str(model_dir), "data": str(data), **options}, [])
    return spec, ObjectiveHooks(registry, spec, load_tokenizer(spec.config))


def _prepare(model_dir, data, **options):
    from align.loop.data import data_sources, prepare_split

    spec, hooks = _spec_and_hooks(model_dir, data, **options)
    [source] = data_sources(spec.config)["train"]
    return prepare_split(hooks, spec.config, source, "train", source.fingerprint())


def test_a_second_run_tokenises_nothing_and_any_change_is_a_new_store(
    tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch
):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "data.jsonl", sft_rows)
    first = _prepare(model_dir, data)
    assert not first.cache_hit and first.key is not None

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again")

    with monkeypatch.context() as patched:
        patched.setattr(build, "write_store", refuse)
        again = _prepare(model_dir, data)
    assert again.cache_hit and again.path == first.path
    assert again.report.as_dict() == first.report.as_dict()
    changed = [
        _prepare(model_dir, data, max_length=16),
        _prepare(model_dir, data, truncation="keep_end"),
        _prepare(model_dir, data, objective="minorsft"),  # same format: the same store
    ]
    assert [c.cache_hit for c in changed] == [False, False, True]
    write_jsonl(data, sft_rows[:-1])  # the data's bytes
    assert not _prepare(model_dir, data).cache_hit
    stores = [p for p in build.stores_dir().iterdir()]
    assert len(stores) == 4


def test_every_part_of_the_key_changes_it(tokenizer, monkeypatch):
    import copy

    def key(fingerprint="data", tok=tokenizer, fmt="prompt_completion", fields=None, **kw):
        options = {"max_length": 64, "truncation": "keep_start", **kw}
        columns = options.pop("columns", None)
        origin = options.pop("origin", "align-core 0.1.0")
        tokenise = RecordTokenizer(fmt, tok, options["max_length"], options["truncation"], fields)
        return build.store_key(fingerprint, tok, tokenise, origin, columns)[0]

    other_template = copy.deepcopy(tokenizer)
    other_template.chat_template = tokenizer.chat_template.replace("<|", "<||")
    other_vocab = copy.deepcopy(tokenizer)
    other_vocab.add_tokens(["<new-token>"])
    keys = {
        key(),
        key(fingerprint="other data"),
        key(tok=other_template),
        key(tok=other_vocab),
        key(fmt="preference"),
        key(origin="align-core 0.2.0"),
        key(fields=Weight),
        key(max_length=32),
        key(truncation="skip"),
        key(columns={"question": "prompt"}),
    }
    monkeypatch.setattr(build, "STORE_VERSION", build.STORE_VERSION + 1)
    keys.add(key())
    monkeypatch.undo()
    monkeypatch.setattr("align.loop.rundir.written_by", lambda: "align-core 9.9")
    keys.add(key())
    assert len(keys) == 12
    assert key() == key()  # and it is stable


def test_a_damaged_store_is_rebuilt(tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "data.jsonl", sft_rows)
    first = _prepare(model_dir, data)
    ids = first.path / "seq0.ids"
    ids.write_bytes(ids.read_bytes()[:-4])  # cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _prepare(model_dir, data)
    assert not again.cache_hit
    assert any("rebuilding the damaged data store" in str(w.message) for w in caught)
    assert len(StoredExamples(again.path)) == len(sft_rows)


KILLED_BUILD = """
import os, signal, sys
from align.data import build, store
from align.data.examples import RecordTokenizer
from align.data.sources import DataSource
from transformers import AutoTokenizer

def killed(self, block):
    os.kill(os.getpid(), signal.SIGKILL)  # mid-build: the first block is being written

store.StoreWriter.add_block = killed
model, data = sys.argv[1:3]
tokenise = RecordTokenizer("prompt_completion", AutoTokenizer.from_pretrained(model), 64, "error")
build.build_cached("k" * 32, DataSource(data).chunks, tokenise, "train", 1, data, None, {})
"""


def test_a_build_killed_midway_leaves_no_store_and_the_next_one_cleans_up(
    tmp_path, model_dir, tokenizer, write_jsonl
):
    cache = tmp_path / "cache"
    data = write_jsonl(tmp_path / "data.jsonl", _many(40))
    env = {**os.environ, "ALIGN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", KILLED_BUILD, str(model_dir), str(data)]
    result = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    left = os.listdir(cache / "data")
    assert len(left) == 1 and left[0].startswith(build.BUILDING)  # never under the key
    os.environ["ALIGN_CACHE"], saved = str(cache), os.environ.get("ALIGN_CACHE")
    try:
        tokenise = RecordTokenizer("prompt_completion", tokenizer, 64, "error")
        built = build.build_cached(
            "k" * 32, DataSource(str(data)).chunks, tokenise, "train", 1, str(data), None, {}
        )
    finally:
        os.environ["ALIGN_CACHE"] = saved or ""
    assert os.listdir(cache / "data") == ["k" * 32]  # the killed build's directory is gone
    assert len(StoredExamples(built.path)) == 40


def test_kto_partners_are_the_same_on_stored_examples(tmp_path, tokenizer, write_jsonl):
    from align_kto.partners import add_mismatched_partners

    rows = [
        {"prompt": f"Prompt {i % 5}? ", "completion": f"answer {i}", "label": i % 3 != 0}
        for i in range(23)
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    in_memory, _ = tokenize_records(read_records(path), "feedback", tokenizer, 24, "keep_end", "t")
    stored, _, _ = _store(tmp_path, tokenizer, path, "feedback", max_length=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = list(add_mismatched_partners(in_memory, 5, 24, "train"))
        got = add_mismatched_partners(stored, 5, 24, "train")
    assert list(got) == expected
    assert got.lengths().tolist() == [
        sum(len(v) for k, v in e.items() if k.endswith("input_ids")) for e in expected
    ]


# -- hub datasets, column mapping and align prepare -------------------------------------------
def _repository(root: Path) -> Path:
    """A dataset repository as the hub lays one out: data files named by split."""
    root.mkdir()
    for split, count in (("train", 12), ("test", 4)):
        rows = [{"question": f"{split} {i} + 1? ", "answer": f"{i + 1}."} for i in range(count)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cli(*args, env=None):
    from click.testing import CliRunner

    from align.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def test_a_hub_dataset_repository_trains_with_a_column_mapping(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    repo = _repository(tmp_path / "repo")
    out = tmp_path / "run"
    result = _cli(
        "run", "--model", model_dir, "--data", repo, "--eval-data", repo,
        "--data-columns", "question=prompt, answer=completion", "--max-steps", 2,
        "--batch-size", 4, "--output-dir", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "run.json").read_text())["data"]
    assert (data["train"]["records"], data["eval"]["records"]) == (12, 4)
    assert data["train"]["ignored_columns"] == {}


def test_a_mapped_column_is_named_as_the_data_names_it(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "1 + 1? ", "answer": "2."}\n{"question": "x", "answer": 3}\n')
    result = _cli(
        "run", "--model", model_dir, "--data", data, "--data-columns", "question=prompt,answer=completion",  # noqa: E501
        "--max-steps", 1, "--output-dir", tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"{data}, line 2, field 'answer': expected a string, got int" in result.output


def test_a_hub_id_the_hub_cannot_serve_is_one_line(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    result = _cli(
        "run", "--model", model_dir, "--data", "someone/no-such-dataset", "--max-steps", 1,
        "--output-dir", tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "someone/no-such-dataset (split train): cannot load the dataset:" in result.output


def test_prepare_fills_the_cache_and_the_run_maps_it(
    tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch
):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "data.jsonl", sft_rows)
    common = ["--model", model_dir, "--data", data, "--max-length", 32]
    prepared = _cli("prepare", *common)
    assert prepared.exit_code == 0, prepared.output
    assert "data train: 8 records → 8 examples" in prepared.output
    assert "data train: tokenised in" in prepared.output
    run = _cli("run", *common, "--max-steps", 1, "--output-dir", tmp_path / "run")
    assert run.exit_code == 0, run.output
    log = (tmp_path / "run" / "train.log").read_text()  # a detail: the console with --verbose
    assert "data train: tokenised examples from the cache" in log
    assert "tokenised in" not in log


ONE_BUILD_PER_NODE = """
import os
from align.data import build

original = build.write_store

def counted(*args, **kwargs):
    with open(os.environ["BUILDS_LOG"], "a") as log:
        log.write(os.environ.get("RANK", "-") + "\\n")
    return original(*args, **kwargs)

build.write_store = counted
"""


@pytest.mark.xdist_group("torchrun")  # torchrun's rendezvous ports: one launch at a time
def test_two_processes_tokenise_once(tmp_path, model_dir, write_jsonl, sft_rows):
    """The local main process builds the store; the other maps it (a sitecustomize module
    counts who calls the builder)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(ONE_BUILD_PER_NODE)
    data = write_jsonl(tmp_path / "data.jsonl", sft_rows)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ALIGN_CACHE": str(tmp_path / "cache"),
        "BUILDS_LOG": str(tmp_path / "builds.log"),
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "align.cli", "run", "--model", str(model_dir), "--data"]
    cmd += [str(data), "--max-steps", "1", "--batch-size", "2", "--num-processes", "2"]
    cmd += ["--output-dir", str(tmp_path / "run")]
    result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    assert (tmp_path / "builds.log").read_text().split() == ["0"]


# -- mixtures -----------------------------------------------------------------------------------
def test_mixture_shares_are_deterministic_under_the_seed(tmp_path, write_jsonl):
    from align.data.mixture import mix
    from align.data.sources import parse_sources
    from align.data.store import ListExamples

    a = write_jsonl(tmp_path / "a.jsonl", [{"n": i} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"n": i} for i in range(6)])
    parts = [ListExamples([{"n": i} for i in range(n)]) for n in (10, 6)]

    def drawn(spec, seed=42):
        sources = parse_sources(spec, "train", None, None, {})
        mixture, contributed = mix(parts[-len(sources) :], sources, seed)
        return [(e["record"].split(",")[0], e["n"]) for e in mixture], contributed

    half, counts = drawn([str(a), f"{b}:0.5"])
    assert counts == [10, 3] and half == drawn([str(a), f"{b}:0.5"])[0]
    assert [n for name, n in half if name == str(a)] == list(range(10))
    picked = [n for name, n in half if name == str(b)]
    assert len(set(picked)) == 3 and picked == sorted(picked)
    assert any(drawn([str(a), f"{b}:0.5"], seed=s)[0] != half for s in range(1, 6))
    repeated, counts = drawn([f"{a}:3", {"path": str(b), "samples": 15}])
    assert counts == [3, 15]
    from_b = [n for name, n in repeated if name == str(b)]
    assert from_b[:12] == [*range(6), *range(6)] and len(set(from_b[12:])) == 3
    assert drawn([{"path": str(b), "weight": 2.0}])[1] == [12]


@pytest.mark.parametrize(
    "item, message",
    [
        (
            {"path": "a.jsonl", "wieght": 2},
            "unknown key 'wieght' for source 'a.jsonl'. Did you mean 'weight'?",
        ),  # noqa: E501
        ({"path": "a.jsonl", "weight": 0.5, "samples": 3}, "has both weight and samples"),
        ({"path": "a.jsonl", "weight": -1}, "weight must be a number > 0"),
        ({"path": "a.jsonl", "samples": 0}, "samples must be an integer ≥ 1"),
        (["not", "a source"], "expected a path or a mapping with `path`"),
    ],
)
def test_bad_mixture_entries_are_refused(item, message):
    from align.data.sources import parse_sources
    from align.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_sources([item], "train", None, None, {})


def test_a_mixture_run_records_its_sources_and_resumes_exactly(
    tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch, crash_copy
):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"Plain text number {i}."} for i in range(6)])
    common = ["--model", model_dir, "--data", a, "--data", f"{b}:0.5", "--batch-size", 2]
    common += ["--lr", "1e-2", "--max-steps", 6, "--save-every", 3, "--log-every", 1]
    done = _cli("run", *common, "--output-dir", tmp_path / "a")
    assert done.exit_code == 0, done.output
    assert "mixture: 8 from " in done.output and f"3 from {b}" in done.output
    info = json.loads((tmp_path / "a" / "run.json").read_text())["data"]["train"]
    assert [(s["path"], s["examples"], s["contributed"]) for s in info["sources"]] == [
        (str(a), 8, 8),
        (str(b), 6, 3),
    ]
    assert info["sources"][1]["weight"] == 0.5 and info["examples"] == 11
    assert info["sha256"].startswith("mixture:")
    crash_copy(tmp_path / "a", tmp_path / "b", checkpoint_step=3, logged_up_to=4)
    changed = _cli("run", *[str(c) for c in common][:4], "--data", f"{b}:0.9", *common[6:],
                   "--output-dir", tmp_path / "b", "--resume")  # fmt: skip
    assert changed.exit_code == 1 and "train data: its content changed" in changed.output
    resumed = _cli("run", *common, "--output-dir", tmp_path / "b", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming at step 3 of 6" in resumed.output

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    for (step, x), (same, y) in zip(losses("a"), losses("b"), strict=True):
        assert step == same and x == pytest.approx(y, abs=1e-6, rel=0)


def test_no_data_cache_tokenises_into_a_temporary_directory_removed_after_the_run(
    tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch
):
    import tempfile

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    data = write_jsonl(tmp_path / "data.jsonl", sft_rows)
    result = _cli(
        "run", "--model", model_dir, "--data", data, "--no-data-cache", "--max-steps", 1,
        "--output-dir", tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "not cached (data_cache off)" in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "cache" / "data").exists()
    assert not any(p.name.startswith("align-data-") for p in (tmp_path / "tmp").iterdir())


def test_the_key_is_stable_across_processes_and_follows_a_formats_code(tokenizer):
    """The key is the same in a new interpreter (no address or hash seed in it), and a format
    whose code changed without a new version is another key."""
    import dataclasses

    from align.data.formats import BUILTIN

    def key(fmt):
        tokenise = RecordTokenizer(fmt, tokenizer, 64, "keep_start")
        return build.store_key("data", tokenizer, tokenise, "align-core 0.1.0")[0]

    script = (
        "import sys\n"
        "from transformers import AutoTokenizer\n"
        "from align.data import build\n"
        "from align.data.examples import RecordTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "t = RecordTokenizer('preference', tok, 64, 'keep_start')\n"
        "print(build.store_key('data', tok, t, 'align-core 0.1.0')[0])\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run(
        [sys.executable, "-c", script, tokenizer.name_or_path],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout.split()[-1] == key("preference")
    edited = dataclasses.replace(BUILTIN["preference"], groups=lambda record: None)
    assert key(edited) != key("preference")


def test_a_subset_of_a_dataset_repository_is_chosen_by_data_subset(
    tmp_path, model_dir, monkeypatch
):
    """A repository whose README declares configs, as hub datasets do; --data-subset picks one."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "repo"
    for name, count in (("easy", 6), ("hard", 9)):
        (repo / name).mkdir(parents=True)
        rows = [{"prompt": f"{name} {i}? ", "completion": f"{i}."} for i in range(count)]
        (repo / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: easy\n  data_files:\n  - split: train\n    path: easy/train.jsonl\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n"
        "---\n"
    )
    runs = {}
    for subset in ("easy", "hard"):
        out = tmp_path / subset
        result = _cli(
            "run", "--model", model_dir, "--data", repo, "--data-subset", subset,
            "--max-steps", 1, "--output-dir", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[subset] = json.loads((out / "run.json").read_text())["data"]["train"]
    assert (runs["easy"]["records"], runs["hard"]["records"]) == (6, 9)
    assert runs["easy"]["sha256"] != runs["hard"]["sha256"]


@pytest.mark.xdist_group("torchrun")
def test_a_bad_record_stops_both_processes_with_its_message(tmp_path, model_dir, write_jsonl):
    """The local main process tokenises and fails; the other, waiting to map the store, stops
    with the same message instead of waiting for ever."""
    rows = [{"prompt": "1 + 1? ", "completion": "2."}] * 3 + [{"prompt": "x", "completion": 5}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "align.cli", "run", "--model", str(model_dir), "--data"]
    cmd += [str(data), "--max-steps", "1", "--num-processes", "2"]
    cmd += ["--output-dir", str(tmp_path / "run")]
    result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode != 0
    message = f"{data}, line 4, field 'completion': expected a string, got int"
    assert result.stderr.count(message) >= 1 and "Traceback" not in result.stderr


def test_the_worker_pool_stops_although_the_run_handles_sigterm():
    """A run turns SIGTERM into "stop after this step"; its forked workers must not inherit
    that, or the pool's terminate() waits for ever on a busy worker (a streaming run hung so
    when its stream was closed)."""
    import signal
    import threading
    import time

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        pool = build.worker_pool(2)
        busy = [pool.apply_async(time.sleep, (30,)) for _ in range(2)]
        time.sleep(1.0)  # both workers are in their task
        stopper = threading.Thread(target=lambda: (pool.terminate(), pool.join()), daemon=True)
        stopper.start()
        stopper.join(10)
        if stopper.is_alive():  # kill them, or the test process would wait too
            for process in pool._pool:
                os.kill(process.pid, signal.SIGKILL)
            stopper.join(10)
            pytest.fail("the pool's terminate() did not stop its workers within 10 s")
        assert not any(result.ready() and result.successful() for result in busy)
    finally:
        signal.signal(signal.SIGTERM, previous)
