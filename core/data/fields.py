"""Record columns checked against a pydantic schema (a format's, or an objective's extra
fields), with errors that name the file, the line and the field; and extra fields collated into
batches, one value per example."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from .records import Record

# What a pydantic error type expects, in the words of the core's other data errors.
_EXPECTED = {
    "float": "a number",
    "int": "an integer",
    "bool": "a boolean",
    "string": "a string",
    "list": "a list",
    "dict": "an object",
    "model": "an object",
}

# Keys the core's examples and batches use: an objective's extra field may not take them.
RESERVED = {"record", "index", "prompt_id", "label", "labels", "scores", "group"}
# and those of on-policy rollout batches (align.Sampling)
RESERVED |= {"prompt", "prompts", "completions", "rewards", "truncated", "completion_lengths"}
RESERVED_SUFFIXES = (
    "input_ids",
    "_mask",
    "position_ids",
    "targets",
    "target_sequence",
    "sequence_digests",
    "attention_block",
    "attention_prompt_block",
)


def column_names(schema: type[BaseModel]) -> list[str]:
    """The columns a schema reads: each field's alias, if it has one, else its name."""
    return [f.alias or name for name, f in schema.model_fields.items()]


def reserved_problem(name: str, format_columns: Sequence[str]) -> str | None:
    """Why an extra field cannot be called ``name``, or None."""
    if name in format_columns:
        return f"field {name!r} is a column of the objective's data format"
    if name in RESERVED or name.endswith(RESERVED_SUFFIXES):
        return f"field {name!r} is a name the core's batches use"
    return None


def validate_columns(record: Record, schema: type[BaseModel]) -> dict[str, Any]:
    """The schema's columns of ``record``, validated: ``name -> value`` (defaults filled in).

    Missing means absent, JSON null, or (CSV) an empty cell. A bad value raises DataError
    ``train.jsonl, line 7, field 'weight': expected a number, got str 'heavy'``.
    """
    given = {}
    for column in column_names(schema):
        value = record.data.get(column)
        if value is None or (record.from_text and value == ""):
            continue
        given[column] = value
    try:
        validated = schema.model_validate(given)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        where = _field(errors[0]["loc"])
        # A union (``str | list``) reports one error per member: say what each would take.
        same = [e for e in errors if _field(e["loc"]) == where]
        raise record.error(_message(same), where) from None
    return validated.model_dump(by_alias=True)


# Parts of an error's location that name a member of a union, not a field.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*)$")


def _field(loc: Sequence[Any]) -> str | None:
    text = ""
    for part in loc:
        if isinstance(part, str) and _UNION_MEMBER.match(part):
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def _message(errors: list[dict[str, Any]]) -> str:
    if any(e["type"] == "missing" for e in errors):
        return "missing field"
    value = errors[0].get("input")
    got = f"got {type(value).__name__} {_short(value)}"
    expected = []
    for error in errors:
        kind: str = error["type"]
        for prefix, words in _EXPECTED.items():
            is_type = kind.endswith(("_type", "_parsing")) or kind == prefix
            if kind.startswith(prefix) and is_type and words not in expected:
                expected.append(words)
    if len(expected) == len(errors):
        return f"expected {' or '.join(expected)}, {got}"
    return f"{errors[0]['msg']} ({got})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def merged_fields(schemas: Sequence[type[BaseModel] | None]) -> type[BaseModel] | None:
    """One schema of every field the objective and the run's rewards read; a field two of
    them declare with different types is an error."""
    from pydantic import create_model

    from ..errors import ConfigError

    present = [s for s in schemas if s is not None]
    if len(present) <= 1:
        return present[0] if present else None
    definitions: dict[str, Any] = {}
    for schema in present:
        for name, info in schema.model_fields.items():
            if name in definitions and definitions[name][0] != info.annotation:
                raise ConfigError(
                    f"record field {name!r} is declared as {definitions[name][0]} and as "
                    f"{info.annotation} by the objective and the rewards: they must agree"
                )
            definitions[name] = (info.annotation, info)
    return create_model("RunFields", __base__=present[0].__base__, **definitions)


def collate(examples: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Each field as one value per example: a tensor when every value is a number or a
    boolean (bool, int64 or float32), else a list."""
    import torch

    out: dict[str, Any] = {}
    for name in names:
        values = [example[name] for example in examples]
        if all(isinstance(v, bool) for v in values):
            out[name] = torch.tensor(values, dtype=torch.bool)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[name] = torch.tensor(values, dtype=torch.long)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[name] = torch.tensor(values, dtype=torch.float32)
        else:
            out[name] = values
    return out
