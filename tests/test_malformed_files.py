"""Malformed data files (CSV structure, corrupt Parquet or saved datasets, JSON nested too
deeply, lone surrogates): each is answered by ``align run`` with one error line naming the
file, the line or record and what is wrong; never a traceback, never a silent drop. Large or
deep files are written at test time; the small ones live in tests/bad_inputs/."""

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from align.cli import cli
from align.data.records import read_records
from align.errors import DataError

CORPUS = Path(__file__).with_name("bad_inputs")
GOOD = {"prompt": "What is 1 + 1? ", "completion": " 2."}
DEEP = 100_000  # levels: far past Python's JSON parser


def _deep_jsonl(path: Path) -> None:
    deep = "[" * DEEP + "]" * DEEP
    path.write_text(json.dumps(GOOD) + '\n{"prompt": ' + deep + ', "completion": " 4."}\n')


def _deep_json(path: Path) -> None:
    deep = "[" * DEEP + "]" * DEEP
    path.write_text("[" + json.dumps(GOOD) + ',\n {"prompt": ' + deep + ', "completion": "4"}]')


def _surrogate_json(path: Path) -> None:
    path.write_text(json.dumps([GOOD, {"prompt": "2 + 2 = ", "completion": "4 \ud83d"}]))


def _bad_utf8_parquet(path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    raw = pa.array([b"What is 1 + 1? ", b"What is \xff? "], type=pa.binary())
    prompts = pa.Array.from_buffers(pa.string(), 2, raw.buffers())  # not validated
    pq.write_table(pa.table({"prompt": prompts, "completion": ["2.", "4."]}), path)


def _corrupt_saved_dataset(path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([GOOD] * 4).save_to_disk(str(path))
    (arrow,) = path.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])


def _huge_integer_jsonl(path: Path) -> None:
    path.write_text(
        json.dumps(GOOD) + "\n" + '{"prompt": "a", "completion": "b", "x": ' + "9" * 5000 + "}\n"
    )


GENERATED = {
    "huge_integer.jsonl": _huge_integer_jsonl,
    "deep.jsonl": _deep_jsonl,
    "deep.json": _deep_json,
    "lone_surrogate.json": _surrogate_json,
    "bad_utf8.parquet": _bad_utf8_parquet,
    "corrupt_dataset": _corrupt_saved_dataset,
}

DATA_ERRORS = [
    ("extra_fields.csv", ", line 3: 5 fields, the header has 2"),
    ("unclosed_quote.csv", ", line 3: a quoted field opened here is never closed"),
    ("unclosed_quote_at_end.csv", ", line 3: a quoted field opened here is never closed"),
    ("quote_inside_quotes.csv", ", line 2: text follows the closing quote of a quoted field"),
    ("multiline_record.csv", ", line 3, field 'completion': is empty"),
    ("corrupt.parquet", ": not a readable Parquet file: Parquet magic bytes not found"),
    (
        "lone_surrogate.jsonl",
        ", line 2, field 'prompt': contains a lone surrogate (\\ud800), "
        "which is not valid Unicode text",
    ),
    (
        "lone_surrogate_message.jsonl",
        ", line 1, field 'messages[1].content': contains a lone surrogate (\\udc00)",
    ),
    ("deep.jsonl", f", line 2: JSON nested too deeply ({DEEP + 1} levels;"),  # + the record
    ("deep.json", f", line 2: JSON nested too deeply ({DEEP + 2} levels;"),  # + the array
    ("lone_surrogate.json", ", record 2, field 'completion': contains a lone surrogate (\\ud83d)"),
    ("bad_utf8.parquet", ", record 2, field 'prompt': is not valid UTF-8"),
    ("corrupt_dataset", ": not a readable saved dataset: "),
    ("huge_integer.jsonl", ", line 2: invalid JSON: Exceeds the limit (4300 digits)"),
]


@pytest.mark.parametrize("name, expected", DATA_ERRORS)
def test_malformed_data_files(name, expected, tmp_path, model_dir, monkeypatch):
    import align.loop.setup

    def no_model(*args, **kwargs):  # the data is refused before any model is loaded
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(align.loop.setup, "load_pretrained", no_model)
    path = CORPUS / name
    if name in GENERATED:
        path = tmp_path / name
        GENERATED[name](path)
    args = ["run", "--model", model_dir, "--data", path, "--output-dir", tmp_path / "out"]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert f"Error: {path}{expected}" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output  # one line


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, newline="")
    return path


def test_a_long_csv_field_is_read_whole(tmp_path):
    long = "x" * 300_000  # over csv's default field limit of 128 KiB
    limit = csv.field_size_limit()
    path = _csv(tmp_path / "long.csv", f'prompt,completion\n"Say x: ","{long}"\nHi ,Hello\n')
    records = read_records(path)
    assert records[0].data == {"prompt": "Say x: ", "completion": long}
    assert [r.location for r in records] == ["line 2", "line 3"]
    assert csv.field_size_limit() == limit  # the process-wide setting is left as it was


def test_csv_records_are_located_at_the_line_where_they_start(tmp_path):
    text = 'prompt,completion\n"a\nb","c"\n\n"d","e\r\n\r\nf"\r\ng,h\n'
    records = read_records(_csv(tmp_path / "multi.csv", text))
    assert [r.location for r in records] == ["line 2", "line 5", "line 8"]
    assert [r.data["completion"] for r in records] == ["c", "e\r\n\r\nf", "h"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("prompt,completion\na,b\nc\n", "line 3: 1 field, the header has 2"),
        (
            "prompt,completion,prompt\na,b,c\n",
            "line 1: column 'prompt' appears twice in the header",
        ),
        (
            'prompt,completion\n"a\nb",c\n"d,e\nf,g\n',
            "line 4: a quoted field opened here is never closed",
        ),
    ],
)
def test_malformed_csv_rows(tmp_path, text, expected):
    with pytest.raises(DataError) as err:
        read_records(_csv(tmp_path / "bad.csv", text))
    assert str(err.value) == f"{tmp_path / 'bad.csv'}, {expected}"


def test_escape_pairs_are_read_and_a_lone_surrogate_in_a_key_is_named(tmp_path):
    path = tmp_path / "escaped.jsonl"
    rows = [{"prompt": "Smile: ", "completion": "\U0001f600 \u00e9"}, {"p": "\\ud800"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))  # \ud83d\ude00: a pair
    assert [r.data for r in read_records(path)] == rows
    path.write_text('{"prompt": "a", "completion": "b", "meta": {"x\\udfff": 1}}\n')
    with pytest.raises(DataError, match=r"line 1, field 'meta.x\\udfff': the field name"):
        read_records(path)
