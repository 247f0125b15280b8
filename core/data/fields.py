"""Record columns checked against a pydantic schema (a format's, or an objective's extra
fields), with errors that name the file, the line and the field; and extra fields collated into
batches, one value per example."""

from __future__ import annotations

import math
import re
import typing
from collections import abc
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from ..plugins.api import type_members
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


def reserved_problem(
    name: str, format_columns: Sequence[str], format_name: str = "the objective's"
) -> str | None:
    """Why an extra field cannot be called ``name`` (a column the data format reads, or a key
    of the core's batches), or None."""
    if name in format_columns:
        return f"field {name!r} is a column of data format {format_name!r}, which reads the data"
    if name in RESERVED or name.endswith(RESERVED_SUFFIXES):
        return f"field {name!r} is a name the core's batches use"
    return None


def validate_columns(record: Record, schema: type[BaseModel]) -> dict[str, Any]:
    """The schema's columns of ``record``, validated: ``name -> value`` (defaults filled in).

    Values are strict where the file has types: in JSON, Parquet and ``datasets`` records a
    number (``int``/``float``, in a list or a nested object too) refuses a boolean (``true`` is
    not 1) and a string (``"0.3"`` is not 0.3); CSV records (``record.from_text``), all text,
    are converted as pydantic converts them. NaN and ±infinity are refused wherever a number
    belongs, CSV's ``nan``/``inf`` too, unless the field allows them
    (``Field(allow_inf_nan=True)``, or ``allow_inf_nan=True`` in the schema's own config). A
    field with its own ``mode="before"``/``"wrap"``/``"plain"`` validator gets the value as
    given, to convert as it says.

    Missing means absent, or (CSV) an empty cell. JSON null: a field whose type admits None
    gets None; a field with a default takes it (Arrow-backed datasets read a key a record
    lacks as null); a required field is an error (``is null``). A bad value raises DataError
    ``train.jsonl, line 7, field 'weight': expected a number, got str 'heavy'``.
    """
    given = {}
    for name, info in schema.model_fields.items():
        column = info.alias or name
        if column not in record.data:
            continue
        value = record.data[column]
        if record.from_text and value == "":
            continue  # an empty CSV cell is missing
        if value is None and not info.is_required() and not _admits_none(info.annotation):
            continue  # null takes the default
        given[column] = value
    strict = _first_strict_problem(schema, given, record.from_text)
    try:
        validated = schema.model_validate(given)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        where = _field(errors[0]["loc"])
        if strict is None or _order(schema, errors[0]["loc"]) < strict[0]:
            # A union (``str | list``) reports one error per member: say what each would take.
            same = [e for e in errors if _field(e["loc"]) == where]
            raise record.error(_message(same), where) from None
    if strict is not None:
        raise record.error(strict[2], strict[1])
    return validated.model_dump(by_alias=True)


# -- strict values -------------------------------------------------------------------------------
_NUMBERS = (int, float)
_NOT_FINITE = "Input should be a finite number"  # pydantic's words, as options' errors say it
# Members of a type that pydantic's lax mode gives no string to (bool takes "true").
_NO_TEXT = (int, float, type(None), list, tuple, set, frozenset, dict)


def _order(schema: type[BaseModel], loc: Sequence[Any]) -> int:
    """The position in ``schema`` of the field an error is about (a model's own error: last)."""
    columns = column_names(schema)
    names = list(schema.model_fields)
    if loc and loc[0] in columns:
        return columns.index(loc[0])
    if loc and loc[0] in names:
        return names.index(loc[0])
    return len(columns)


def _first_strict_problem(
    schema: type[BaseModel], given: dict[str, Any], from_text: bool
) -> tuple[int, str, str] | None:
    """The first field, in the schema's order, whose value is refused by the strict rules:
    ``(its position, the field as named in errors, the message)``, or None."""
    problem = _model_problem(schema, given, (), from_text)
    if problem is None:
        return None
    loc, message = problem
    return _order(schema, loc), _field(loc) or "", message


def _model_problem(
    schema: type[BaseModel], data: dict[str, Any], loc: tuple, from_text: bool
) -> tuple[tuple, str] | None:
    decorators = schema.__pydantic_decorators__
    if any(d.info.mode in ("before", "wrap") for d in decorators.model_validators.values()):
        return None  # the model converts its input itself
    converted = _converted_fields(schema)
    allow_nan = schema.model_config.get("allow_inf_nan") is True
    for name, info in schema.model_fields.items():
        key = info.alias if info.alias in data else name
        if key not in data or name in converted:
            continue
        metadata = list(info.metadata)
        problem = _problem(info.annotation, metadata, data[key], (*loc, key), from_text, allow_nan)
        if problem is not None:
            return problem
    return None


def _converted_fields(schema: type[BaseModel]) -> set[str]:
    """Fields with a validator of the schema's own that sees the raw value (``mode="before"``,
    ``"wrap"`` or ``"plain"``): the value is theirs to convert. The base classes' boolean
    check (:class:`align.Fields`) is not such a validator."""
    from ..plugins.api import _NumberRules

    ours = set(_NumberRules.__pydantic_decorators__.field_validators)
    fields: set[str] = set()
    for key, decorator in schema.__pydantic_decorators__.field_validators.items():
        if key in ours or decorator.info.mode == "after":
            continue
        names = decorator.info.fields
        fields.update(schema.model_fields if "*" in names else names)
    return fields


def _admits_none(annotation: Any) -> bool:
    for member, _ in type_members(annotation, []):
        if member in (type(None), None, Any, object):
            return True
        if typing.get_origin(member) is typing.Literal and None in typing.get_args(member):
            return True
    return False


def _converts(metadata: list[Any]) -> bool:
    from pydantic.functional_validators import BeforeValidator, PlainValidator, WrapValidator

    return any(isinstance(m, BeforeValidator | PlainValidator | WrapValidator) for m in metadata)


def _allows_nan(metadata: list[Any], default: bool) -> bool:
    for item in reversed(metadata):
        allowed = getattr(item, "allow_inf_nan", None)
        if allowed is not None:
            return bool(allowed)
    return default


def _problem(
    annotation: Any, metadata: list[Any], value: Any, loc: tuple, from_text: bool, allow_nan: bool
) -> tuple[tuple, str] | None:
    """Why ``value`` at ``loc`` breaks the strict rules for a field of this type, or None
    (pydantic's own checks still follow)."""
    if value is None:
        return None
    members = type_members(annotation, metadata)
    if any(_converts(meta) for _, meta in members):
        return None
    types_ = [m for m, _ in members]
    if any(m in (Any, object) or isinstance(m, typing.TypeVar) for m in types_):
        return None
    numbers = [m for m in types_ if m in _NUMBERS]
    if numbers:
        kind = "a number" if float in numbers else "an integer"
        number_meta = [meta for m, meta in members if m in _NUMBERS]
        nan_ok = all(_allows_nan(meta, allow_nan) for meta in number_meta)
        if isinstance(value, bool):
            if bool not in types_ and not any(_literal_has(m, bool) for m in types_):
                return loc, f"expected {kind}, got bool {value!r}"
            return None
        if isinstance(value, str):
            if from_text:
                if not nan_ok and float in numbers and not _finite_text(value):
                    return loc, f"{_NOT_FINITE} (got str {_short(value)})"
                return None
            if all(_takes_no_text(m) for m in types_):
                hint = ""
                try:
                    float(value)
                    hint = " (a number in quotes is text here: write it without quotes)"
                except ValueError:
                    pass
                return loc, f"expected {kind}, got str {_short(value)}{hint}"
            return None
        if isinstance(value, float) and not math.isfinite(value) and not nan_ok:
            return loc, f"{_NOT_FINITE} (got float {value!r})"
        if isinstance(value, int | float):
            return None
    return _container_problem(members, value, loc, from_text, allow_nan)


def _container_problem(
    members: list[tuple[Any, list[Any]]], value: Any, loc: tuple, from_text: bool, allow_nan: bool
) -> tuple[tuple, str] | None:
    """The first problem inside a list or an object, when exactly one member of the type takes
    it (else pydantic alone decides)."""
    if isinstance(value, list | tuple):
        sequences = [(m, meta) for m, meta in members if _origin(m) in _SEQUENCES]
        if len(sequences) != 1:
            return None
        member, _ = sequences[0]
        args = typing.get_args(member)
        if _origin(member) is tuple and args and args[-1] is not Ellipsis:
            items = list(zip(args, value, strict=False))
        else:
            items = [(args[0] if args else Any, item) for item in value]
        for i, (item_type, item) in enumerate(items):
            problem = _problem(item_type, [], item, (*loc, i), from_text, allow_nan)
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        mappings = [m for m, _ in members if _origin(m) in _MAPPINGS or _is_model(m)]
        if len(mappings) != 1:
            return None
        member = mappings[0]
        if _is_model(member):
            return _model_problem(member, value, loc, from_text)
        args = typing.get_args(member)
        item_type = args[1] if len(args) == 2 else Any
        for key, item in value.items():
            problem = _problem(item_type, [], item, (*loc, key), from_text, allow_nan)
            if problem is not None:
                return problem
    return None


_SEQUENCES = (list, tuple, set, frozenset, abc.Sequence, abc.Set, abc.MutableSequence)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


def _origin(member: Any) -> Any:
    return typing.get_origin(member) or member


def _is_model(member: Any) -> bool:
    return isinstance(member, type) and issubclass(member, BaseModel)


def _literal_has(member: Any, kind: type) -> bool:
    return typing.get_origin(member) is typing.Literal and any(
        isinstance(a, kind) for a in typing.get_args(member)
    )


def _takes_no_text(member: Any) -> bool:
    """Whether pydantic's lax mode refuses every string for this member of a type."""
    if typing.get_origin(member) is typing.Literal:
        return not any(isinstance(a, str) for a in typing.get_args(member))
    return _origin(member) in _NO_TEXT + _SEQUENCES + _MAPPINGS or _is_model(member)


def _finite_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return True  # not a number at all: pydantic says so


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
    if value is None and all(e.get("input", 0) is None for e in errors):
        if expected:
            return f"is null (expected {' or '.join(expected)})"
        text = errors[0]["msg"]
        return f"is null ({text[:1].lower()}{text[1:]})"
    if len(expected) == len(errors):
        return f"expected {' or '.join(expected)}, {got}"
    return f"{errors[0]['msg']} ({got})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def merged_fields(schemas: Sequence[type[BaseModel] | None]) -> type[BaseModel] | None:
    """One schema of every field the objective and the run's rewards read; a field two of
    them declare with different types is an error. A field of any type (a reward function's
    unannotated column) takes the type another declares."""
    from pydantic import create_model

    from ..errors import ConfigError

    present = [s for s in schemas if s is not None]
    if len(present) <= 1:
        return present[0] if present else None
    definitions: dict[str, Any] = {}
    for schema in present:
        for name, info in schema.model_fields.items():
            if name in definitions and info.annotation is Any:
                continue
            if name in definitions and definitions[name][0] is Any:
                definitions[name] = (info.annotation, info)
                continue
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
