"""Strict values: a number field of a JSON, Parquet or datasets record refuses booleans and
numeric strings (CSV, all text, still converts), NaN and infinity unless the field allows them;
null is "is null" for a required field; a reward's values are finite numbers, one a
completion, else an error naming the reward and the completion's record."""

import csv
import enum
import math
from typing import Annotated, Any, Literal

import numpy as np
import pytest
import torch
from pydantic import BaseModel, Field, field_validator

import align
from align.data.fields import validate_columns
from align.data.formats import RankedRecord
from align.data.records import Record, read_records
from align.errors import PluginError
from align.rollout.rewards import ChosenReward, RewardSet


class Weight(align.Fields):
    weight: float = Field(1.0, ge=0)


class Required(align.Fields):
    score: float


class Plain(BaseModel):  # a plugin's own schema, not align.Fields: pydantic's defaults
    weight: float = Field(1.0, ge=0)
    steps: int = 1


def _check(data: dict, schema: Any, from_text: bool = False) -> dict:
    return validate_columns(Record(data, "train.jsonl", "line 2", from_text), schema)


def _refused(data: dict, schema: Any, from_text: bool = False) -> str:
    with pytest.raises(align.DataError) as info:
        _check(data, schema, from_text)
    return str(info.value)


# -- booleans and numeric strings ----------------------------------------------------------------
@pytest.mark.parametrize("schema", [Weight, Plain])
def test_json_true_is_not_a_number(schema):
    assert _refused({"weight": True}, schema) == (
        "train.jsonl, line 2, field 'weight': expected a number, got bool True"
    )
    assert "expected an integer, got bool False" in _refused({"steps": False}, Plain)


@pytest.mark.parametrize("schema", [Weight, Plain])
def test_a_numeric_string_is_not_a_number(schema):
    message = _refused({"weight": "0.3"}, schema)
    assert message.startswith("train.jsonl, line 2, field 'weight': expected a number, got str")
    assert "'0.3'" in message
    assert "expected an integer, got str '3'" in _refused({"steps": "3"}, Plain)


def test_numbers_inside_lists_and_nested_objects_are_strict():
    class Nested(BaseModel):
        ratio: float

    class Many(align.Fields):
        weights: list[float] = []
        parts: dict[str, Nested] = {}
        maybe: list[float] | None = None

    assert "field 'weights[1]': expected a number, got bool True" in _refused(
        {"weights": [0.5, True]}, Many
    )
    assert "field 'parts.a.ratio': expected a number, got str '0.3'" in _refused(
        {"parts": {"a": {"ratio": "0.3"}}}, Many
    )
    assert "field 'maybe[0]'" in _refused({"maybe": ["1"]}, Many)
    ranked = {"prompt": "p", "completions": ["a", "b"], "scores": [True, 0.5]}
    assert "field 'scores[0]': expected a number, got bool True" in _refused(ranked, RankedRecord)
    ranked["scores"] = [1.0, "0.3"]
    assert "field 'scores[1]': expected a number, got str '0.3'" in _refused(ranked, RankedRecord)


def test_other_field_types_are_unchanged():
    class Color(enum.Enum):
        RED = "red"

    class Level(enum.IntEnum):
        LOW = 1

    class Inner(BaseModel):
        name: str
        size: int = 0

    class Mixed(align.Fields):
        text: str | list[dict[str, Any]] = ""
        mode: Literal["a", "b"] = "a"
        color: Color = Color.RED
        level: Level = Level.LOW
        inner: Inner | None = None
        flag: bool = False
        either: float | str = 0.0
        number: float = 0.0
        count: int = 0
        anything: Any = None

    data = {
        "text": [{"role": "user", "content": "hi"}],
        "mode": "b",
        "color": "red",
        "level": 1,
        "inner": {"name": "x", "size": 2},
        "flag": True,
        "either": "0.3",  # a string is one of its types
        "number": 2,  # an integer is a number
        "count": 3.0,  # pydantic takes a whole float for an integer, as before
        "anything": "0.3",
    }
    got = _check(data, Mixed)
    assert got["text"] == data["text"] and got["mode"] == "b" and got["color"] == Color.RED
    assert got["inner"] == {"name": "x", "size": 2} and got["flag"] is True
    assert got["either"] == "0.3" and got["number"] == 2.0 and got["count"] == 3
    assert got["anything"] == "0.3" and got["level"] == Level.LOW


def test_a_fields_own_before_validator_still_converts():
    class Named(align.Fields):
        weight: float = 1.0

        @field_validator("weight", mode="before")
        @classmethod
        def _named(cls, value):
            return {"heavy": 2.0}.get(value, value)

    assert _check({"weight": "heavy"}, Named) == {"weight": 2.0}


# -- non-finite numbers -------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [Weight, Plain])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_as_not_finite(schema, value):
    message = _refused({"weight": value}, schema)
    assert message.startswith("train.jsonl, line 2, field 'weight': ")
    assert message.endswith(f"Input should be a finite number (got float {value!r})")


def test_a_field_may_allow_nan_and_infinity():
    class Open(align.Fields):
        bound: float = Field(0.0, allow_inf_nan=True)
        scores: list[Annotated[float, Field(allow_inf_nan=True)]] = []

    got = _check({"bound": math.inf, "scores": [math.nan, 1.0]}, Open)
    assert got["bound"] == math.inf and math.isnan(got["scores"][0])


def test_csv_text_is_still_converted(tmp_path, tokenizer):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion", "weight", "steps"])
        writer.writerow(["Hi ", "Hello.", "0.3", "2"])
        writer.writerow(["Bye ", "Bye.", "", ""])
        writer.writerow(["Oh ", "Oh.", "nan", "1"])
    first, second, third = read_records(path)
    assert _check(first.data, Plain, from_text=True) == {"weight": 0.3, "steps": 2}
    assert validate_columns(first, Weight) == {"weight": 0.3}
    assert validate_columns(second, Plain) == {"weight": 1.0, "steps": 1}  # empty: missing
    with pytest.raises(
        align.DataError,
        match=rf"{path}, line 4, field 'weight': Input should be a finite number \(got str 'nan'\)",
    ):
        validate_columns(third, Plain)


# -- null ----------------------------------------------------------------------------------------
def test_null_for_a_required_field_is_null_not_missing():
    message = _refused({"score": None}, Required)
    assert message.startswith("train.jsonl, line 2, field 'score': is null")
    assert "missing" not in message
    assert _refused({}, Required) == "train.jsonl, line 2, field 'score': missing field"


def test_null_takes_none_where_the_type_admits_it_else_the_default():
    class Optional(align.Fields):
        cap: float | None = 2.0
        weight: float = 1.0
        note: str | None = None

    assert _check({"cap": None, "weight": None, "note": None}, Optional) == {
        "cap": None,
        "weight": 1.0,
        "note": None,
    }
    assert _check({}, Optional) == {"cap": 2.0, "weight": 1.0, "note": None}


# -- through the readers --------------------------------------------------------------------------
def test_json_parquet_and_datasets_records_are_strict(tmp_path, write_jsonl):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"weight": 0.5}, {"weight": "0.3"}]
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(align.DataError) as info:
        [validate_columns(r, Weight) for r in read_records(jsonl)]
    assert str(info.value) == (
        f"{jsonl}, line 2, field 'weight': expected a number, got str '0.3' (a number in quotes "
        "is text here: write it without quotes)"
    )

    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"weight": False}, {"weight": True}]), parquet)
    with pytest.raises(align.DataError) as info:
        [validate_columns(r, Weight) for r in read_records(parquet)]
    assert str(info.value) == (
        f"{parquet}, record 1, field 'weight': expected a number, got bool False"
    )

    saved = tmp_path / "ds"
    datasets.Dataset.from_list([{"score": 1.0}, {"score": None}]).save_to_disk(saved)
    with pytest.raises(align.DataError, match=r"record 2, field 'score': is null"):
        [validate_columns(r, Required) for r in read_records(saved)]
    # Arrow reads a key a record lacks as null: a field with a default takes its default
    saved = tmp_path / "ds2"
    datasets.Dataset.from_list([{"weight": 0.5, "x": 1}, {"x": 2}]).save_to_disk(saved)
    assert [validate_columns(r, Weight) for r in read_records(saved)] == [
        {"weight": 0.5},
        {"weight": 1.0},
    ]


# -- rewards -------------------------------------------------------------------------------------
def _reward(function):
    return ChosenReward(align.Reward("mine", "a test reward", function), 1.0, None, "my-dist 1.0")


ARGS = (["p"] * 3, ["a", "b", "c"], [[1]] * 3, {}, ["line 1", "line 2", "line 3"])


@pytest.mark.parametrize(
    "bad, shown",
    [("0.3", "'0.3'"), (True, "True"), (None, "None"), (np.bool_(True), "True"), (math.nan, "nan")],
)
def test_a_reward_value_that_is_not_a_finite_number_is_named(bad, shown):
    rewards = RewardSet([_reward(lambda completions: [1.0, bad, 0.0])], None, "train.jsonl")
    with pytest.raises(PluginError) as info:
        rewards.score(*ARGS)
    message = str(info.value)
    assert message.startswith("reward 'mine' (my-dist 1.0) returned ")
    assert shown in message and "train.jsonl, line 2" in message
    assert "line 1" not in message and "line 3" not in message


@pytest.mark.parametrize("result", [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0], 1.0, None])
def test_a_reward_must_return_one_value_per_completion(result):
    rewards = RewardSet([_reward(lambda completions: result)], None, "train.jsonl")
    with pytest.raises(PluginError) as info:
        rewards.score(*ARGS)
    message = str(info.value)
    assert message.startswith("reward 'mine' (my-dist 1.0) returned ")
    assert "3 completions" in message and "train.jsonl, line 1" in message
    assert "raised" not in message


def test_numpy_and_torch_numbers_are_numbers():
    values = [np.float32(0.5), np.int64(2), torch.tensor(1.5)]
    rewards = RewardSet([_reward(lambda completions: values)], None, "train.jsonl")
    assert rewards.score(*ARGS) == [[0.5, 2.0, 1.5]]
    as_array = RewardSet([_reward(lambda completions: np.array([1, 0, 1]))], None, None)
    assert as_array.score(*ARGS) == [[1.0, 0.0, 1.0]]
    as_tensor = RewardSet([_reward(lambda completions: torch.tensor([0.0, 1.0, 2.0]))], None, None)
    assert as_tensor.score(*ARGS) == [[0.0, 1.0, 2.0]]
    assert all(type(v) is float for v in as_tensor.score(*ARGS)[0])
