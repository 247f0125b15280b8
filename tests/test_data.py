"""Reading data files and turning records into examples: every bad input gets a clear error
naming file, line/record and field; truncation and skips are counted, never silent."""

import json

import pytest

from align.data.examples import tokenize_records
from align.data.records import read_records
from align.errors import DataError


def _tokenize(tokenizer, path, fmt="prompt_completion", max_length=64, truncation="keep_start"):
    return tokenize_records(read_records(path), fmt, tokenizer, max_length, truncation, "train")


def _error(tokenizer, tmp_path, rows, fmt="prompt_completion", raw=None, name="d.jsonl"):
    path = tmp_path / name
    if raw is None:
        raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(raw)
    with pytest.raises(DataError) as err:
        _tokenize(tokenizer, path, fmt)
    return str(err.value)


GOOD = {"prompt": "1 + 1 =", "completion": " 2."}


@pytest.mark.parametrize(
    "rows, fmt, expected",
    [
        ([GOOD, {"prompt": "x"}], "prompt_completion", "line 2, field 'completion': missing field"),
        (
            [{"prompt": 3, "completion": "a"}],
            "prompt_completion",
            "line 1, field 'prompt': expected a string, got int",
        ),
        (
            [{"prompt": "a", "completion": "  "}],
            "prompt_completion",
            "field 'completion': is empty",
        ),
        ([{"question": "a"}], "prompt_completion", "expected fields prompt and completion"),
        (
            [{"messages": [{"role": "robot", "content": "x"}]}],
            "prompt_completion",
            "line 1, field 'messages[0].role': unknown role 'robot'",
        ),
        (
            [{"prompt": "a", "completion": "b", "label": "yes"}],
            "feedback",
            "line 1, field 'label': expected a boolean",
        ),
        ([{"prompt": "a", "completion": "b"}], "feedback", "field 'label': missing field"),
        ([{"prompt": "a", "chosen": "b"}], "preference", "field 'rejected': missing field"),
        (
            [{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}],
            "preference",
            "field 'chosen': expected a list of messages",
        ),
        (
            [
                {
                    "prompt": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
                    "completion": [{"role": "assistant", "content": "c"}],
                }
            ],
            "prompt_completion",
            "line 1, field 'prompt[1].role': unknown role 'bot'",
        ),
    ],
)
def test_bad_records(tokenizer, tmp_path, rows, fmt, expected):
    message = _error(tokenizer, tmp_path, rows, fmt)
    assert str(tmp_path / "d.jsonl") in message and expected in message


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"", "contains no records"),
        (b"\n\n", "contains no records"),
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": \n', "line 2: invalid JSON"),
        (b"[1, 2]\n", "line 1: expected a JSON object, got list"),
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n',
            "line 2: is not valid UTF-8",
        ),
    ],
)
def test_bad_files(tokenizer, tmp_path, raw, expected):
    assert expected in _error(tokenizer, tmp_path, None, raw=raw)


def test_byte_order_mark_is_tolerated(tokenizer, tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\n1 + 1 =, 2.\n")
    for name in ("bom.jsonl", "bom.csv"):
        examples, _ = _tokenize(tokenizer, tmp_path / name)
        assert len(examples) == 1, name


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_records(tmp_path / "d.txt")


def test_json_array_csv_and_parquet(tokenizer, tmp_path, write_jsonl):
    rows = [GOOD, {"prompt": "2 + 2 =", "completion": " 4."}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    import csv

    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion", "label"])
        writer.writeheader()
        writer.writerows([{**r, "label": "true"} for r in rows])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    jsonl, _ = _tokenize(tokenizer, write_jsonl(tmp_path / "a.jsonl", rows))
    for name in ("a.json", "a.csv", "a.parquet"):
        examples, report = _tokenize(tokenizer, tmp_path / name)
        assert [e["input_ids"] for e in examples] == [e["input_ids"] for e in jsonl], name
    feedback, _ = _tokenize(tokenizer, tmp_path / "a.csv", "feedback")
    assert [e["label"] for e in feedback] == [True, True]
    assert "line 3" in read_records(tmp_path / "a.csv")[1].location


def test_saved_dataset_directory(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([GOOD]).save_to_disk(tmp_path / "ds")
    examples, _ = _tokenize(tokenizer, tmp_path / "ds")
    assert len(examples) == 1
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(
        tmp_path / "dd"
    )
    with pytest.raises(DataError, match="several splits"):
        read_records(tmp_path / "dd")


LONG = {"prompt": "What is " + "1 + " * 30 + "1?", "completion": " 31."}


def test_truncation_keep_start_counts_and_skips_when_no_completion_left(
    tokenizer, tmp_path, write_jsonl
):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, LONG, {"prompt": "a", "completion": " b" * 40}])
    examples, report = _tokenize(tokenizer, path, max_length=20)
    # LONG loses its whole completion: skipped and counted; the third is cut but trainable.
    assert report.records == 3 and report.examples == 2
    assert report.truncated == 1
    assert report.skipped == {"no completion tokens within max_length": 1}
    assert all(len(e["input_ids"]) <= 20 for e in examples)
    assert "1 skipped (no completion tokens within max_length)" in report.summary()


def test_truncation_keep_end_keeps_the_completion(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, LONG])
    examples, report = _tokenize(tokenizer, path, max_length=20, truncation="keep_end")
    assert report.examples == 2 and report.truncated == 1
    assert examples[1]["input_ids"][-1] == tokenizer.eos_token_id


def test_truncation_skip_and_error(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, LONG])
    _, report = _tokenize(tokenizer, path, max_length=20, truncation="skip")
    assert report.examples == 1 and report.skipped == {"longer than max_length 20": 1}
    with pytest.raises(DataError, match=r"line 2: is \d+ tokens long, over max_length 20"):
        _tokenize(tokenizer, path, max_length=20, truncation="error")


def test_nothing_usable_is_an_error(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [LONG])
    with pytest.raises(DataError, match="no usable examples"):
        _tokenize(tokenizer, path, max_length=20, truncation="skip")


def test_keep_end_keeps_one_prompt_for_chosen_and_rejected(tokenizer, tmp_path, write_jsonl):
    row = {"prompt": "What is " + "1 + " * 8 + "1?", "chosen": " 9.", "rejected": " It is nine."}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    (full,), _ = _tokenize(tokenizer, path, "preference", max_length=1024)
    (cut,), report = _tokenize(tokenizer, path, "preference", max_length=14, truncation="keep_end")
    assert report.truncated == 1
    dropped = len(full["rejected_input_ids"]) - 14
    for side in ("chosen", "rejected"):
        assert cut[f"{side}_input_ids"] == full[f"{side}_input_ids"][dropped:]
    prompt = [
        t
        for t, m in zip(cut["chosen_input_ids"], cut["chosen_completion_mask"], strict=True)
        if not m
    ]
    assert prompt == [
        t
        for t, m in zip(cut["rejected_input_ids"], cut["rejected_completion_mask"], strict=True)
        if not m
    ]


def test_preference_and_feedback_examples(tokenizer, tmp_path, write_jsonl):
    pref = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "1 + 1 =", "chosen": " 2.", "rejected": " 3."}]
    )
    (example,), _ = _tokenize(tokenizer, pref, "preference")
    assert example["chosen_input_ids"] != example["rejected_input_ids"]
    assert sum(example["chosen_completion_mask"]) == sum(example["rejected_completion_mask"])
    fb = write_jsonl(tmp_path / "f.jsonl", [{**GOOD, "label": False}])
    (example,), _ = _tokenize(tokenizer, fb, "feedback")
    assert example["label"] is False


def test_paired_records_split_into_feedback_examples(tokenizer, tmp_path, write_jsonl):
    """KTO data may be paired: each record gives a desirable and an undesirable example."""
    rows = [
        {"prompt": "1 + 1 =", "chosen": " 2.", "rejected": " 3."},
        {"prompt": "2 + 2 =", "completion": " 4.", "label": True},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    examples, report = _tokenize(tokenizer, path, "feedback")
    (pref,), _ = _tokenize(tokenizer, write_jsonl(tmp_path / "q.jsonl", rows[:1]), "preference")
    assert [e["label"] for e in examples] == [True, False, True]
    assert examples[0]["input_ids"] == pref["chosen_input_ids"]
    assert examples[1]["input_ids"] == pref["rejected_input_ids"]
    assert (report.records, report.examples) == (2, 3)
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a", "chosen": " b"}])
    with pytest.raises(DataError, match="line 1, field 'rejected': missing field"):
        _tokenize(tokenizer, bad, "feedback")
