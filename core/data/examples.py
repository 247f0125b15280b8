"""Records to tokenised examples through a data format, with a report of what happened.

A format turns each record into groups (a prompt and its answers); each group is tokenised
into one example: ``<prefix>input_ids`` and ``<prefix>completion_mask`` per answer, the group's
values, the objective's extra fields and ``record`` (where it came from). Over-long sequences
follow the truncation policy, and every truncated or skipped example is counted in the report,
as are the columns nothing reads.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ..errors import DataError
from ..plugins.api import DataFormat, Group
from .fields import column_names, validate_columns
from .formats import BUILTIN
from .records import Record
from .shapes import SHAPES
from .tokenize import (
    Tokenized,
    TokenizeError,
    check_messages,
    tokenize_conversation,
    tokenize_prompt,
    tokenize_prompt_completion,
    tokenize_text,
)

TRUNCATION_POLICIES = ("keep_start", "keep_end", "skip", "error")


@dataclass
class DataReport:
    """What happened to every record of one split."""

    split: str
    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    ignored_columns: Counter = field(default_factory=Counter)  # column → records that had it
    sources: list = field(default_factory=list)  # a mixture's: each source and its share
    format: str = ""  # the data format that read the records, and how it was chosen

    def summary(self) -> str:
        text = f"{self.split}: {self.records} records → {self.examples} examples"
        if self.truncated:
            text += f"; {self.truncated} truncated"
        for reason, count in sorted(self.skipped.items()):
            text += f"; {count} skipped ({reason})"
        if self.ignored_columns:
            text += f"; ignored columns: {', '.join(sorted(self.ignored_columns))}"
        if self.sources:
            shares = ", ".join(f"{s['contributed']} from {s['path']}" for s in self.sources)
            text += f"; mixture: {shares}"
        if self.format:
            text += f"; format {self.format}"
        return text

    def add(self, other: DataReport) -> None:
        """Count another part of the split's records (a worker's chunk) into this report."""
        self.records += other.records
        self.examples += other.examples
        self.truncated += other.truncated
        self.skipped.update(other.skipped)
        self.ignored_columns.update(other.ignored_columns)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "examples": self.examples,
            "truncated": self.truncated,
            "skipped": dict(self.skipped),
            "ignored_columns": dict(sorted(self.ignored_columns.items())),
            **({"format": self.format} if self.format else {}),
            **({"sources": self.sources} if self.sources else {}),
        }


class _Skip(Exception):
    """An example dropped by the truncation policy (counted, never silent)."""


def _string(record: Record, value: Any, name: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise record.error(f"expected a string, got {type(value).__name__}", name)
    if not allow_empty and not value.strip():
        raise record.error("is empty", name)
    return value


def tokenize_answer(
    tokenizer: Any, record: Record, prompt: Any, answer: Any, name: str
) -> Tokenized:
    """One answer after its prompt (both strings, or both message lists); without a prompt, a
    whole text (every token trained) or a whole conversation (assistant turns trained)."""
    if prompt is None:
        if isinstance(answer, list):
            return tokenize_conversation(tokenizer, answer, field=name)
        return tokenize_text(tokenizer, _string(record, answer, name, allow_empty=False))
    if isinstance(prompt, list) or isinstance(answer, list):
        for label, value in (("prompt", prompt), (name, answer)):
            if not isinstance(value, list):
                raise record.error("expected a list of messages, like the other field", label)
            check_messages(value, label)  # so a bad message is named within its own field
        return tokenize_conversation(
            tokenizer, prompt + answer, trained_from=len(prompt), field=name
        )
    _string(record, prompt, "prompt")
    completion = _string(record, answer, name, allow_empty=False)
    return tokenize_prompt_completion(tokenizer, prompt, completion)


def tokenize_group(tokenizer: Any, record: Record, group: Group) -> dict[str, Any]:
    """A group's example: every answer's ``<prefix>input_ids`` and ``<prefix>completion_mask``,
    then the group's values."""
    if not group.answers:
        if group.prompt is None:
            raise record.error("the data format gave a group with neither prompt nor answers")
        try:
            ids = tokenize_prompt(tokenizer, group.prompt)
        except TokenizeError as exc:
            raise record.error(str(exc), exc.field) from None
        return {"prompt_input_ids": ids, **group.values}
    example: dict[str, Any] = {}
    for prefix, answer in group.answers.items():
        name = group.field_of(prefix)
        try:
            tok = tokenize_answer(tokenizer, record, group.prompt, answer, name)
        except TokenizeError as exc:
            raise record.error(str(exc), exc.field) from None
        example[f"{prefix}input_ids"] = tok.input_ids
        example[f"{prefix}completion_mask"] = tok.completion_mask
    example.update(group.values)
    return example


def _truncate(example: dict[str, Any], max_length: int, policy: str, record: Record) -> bool:
    """Apply the policy to every sequence of the example in place; True if anything was cut.

    ``keep_end`` removes the same number of leading tokens from every sequence of the example,
    so the answers to one prompt keep one and the same (shortened) prompt.
    """
    if "prompt_input_ids" in example:  # a prompt to sample from: its end leads to the answer
        return _truncate_prompt(example, max_length, policy, record)
    keys = [k for k in example if k.endswith("input_ids")]
    longest = max(len(example[k]) for k in keys)
    if longest > max_length:
        if policy == "error":
            raise record.error(
                f"is {longest} tokens long, over max_length {max_length} (truncation=error)"
            )
        if policy == "skip":
            raise _Skip(f"longer than max_length {max_length}")
        drop = longest - max_length
        for key in keys:
            mask_key = key.replace("input_ids", "completion_mask")
            keep = slice(None, max_length) if policy == "keep_start" else slice(drop, None)
            example[key], example[mask_key] = example[key][keep], example[mask_key][keep]
    for key in keys:
        if not any(example[key.replace("input_ids", "completion_mask")][1:]):  # 0 is no target
            raise _Skip("no completion tokens within max_length")
    return longest > max_length


def _truncate_prompt(example: dict[str, Any], max_length: int, policy: str, record: Record) -> bool:
    """A prompt longer than ``max_length`` (the prompt's limit in on-policy runs, as TRL's
    ``max_prompt_length``): the policy applies, ``keep_start`` too (it cuts the prompt's end)."""
    ids = example["prompt_input_ids"]
    if len(ids) <= max_length:
        return False
    if policy == "error":
        raise record.error(
            f"the prompt is {len(ids)} tokens long, over max_length {max_length} (truncation=error)"
        )
    if policy == "skip":
        raise _Skip(f"prompt longer than max_length {max_length}")
    example["prompt_input_ids"] = ids[:max_length] if policy == "keep_start" else ids[-max_length:]
    return True


class RecordTokenizer:
    """Tokenises one record at a time into its examples through a data format, counting in a
    report what truncation cut or skipped and the columns nothing reads. Picklable state only
    is set up front, so a forked worker process runs it as the parent does."""

    def __init__(
        self,
        data_format: str | DataFormat,
        tokenizer: Any,
        max_length: int,
        truncation: str,
        fields: type[BaseModel] | None = None,
    ) -> None:
        self.format = BUILTIN[data_format] if isinstance(data_format, str) else data_format
        self.tokenizer, self.max_length, self.truncation = tokenizer, max_length, truncation
        self.fields = fields
        self.claimed = {*self.format.columns, *(column_names(fields) if fields else ())}
        self.shape = SHAPES.get(self.format.shape)  # every group is checked against it

    def groups(self, record: Record) -> tuple[Record, list[Group]]:
        """The record with its format's columns validated, and the groups the format makes of
        it, each an ``align.Group`` of the format's shape (else a DataError naming the record)."""
        fmt = self.format
        if fmt.schema is not None:
            validated = validate_columns(record, fmt.schema)
            record = dataclasses.replace(record, data={**record.data, **validated})
        built = fmt.groups(record)
        groups = built if isinstance(built, list) else [built]
        for group in groups:
            if not isinstance(group, Group):
                raise DataError(
                    f"data format {fmt.name!r} returned {type(group).__name__}, expected "
                    "align.Group",
                    source=record.source,
                    location=record.location,
                )
            problem = self.shape.check(group) if self.shape is not None else None
            if problem is not None:
                raise DataError(
                    f"data format {fmt.name!r} declares shape {fmt.shape!r}, but gave this "
                    f"record a group with {problem} (a bug in the format's plugin)",
                    source=record.source,
                    location=record.location,
                )
        return record, groups

    def examples(self, record: Record, report: DataReport) -> list[dict[str, Any]]:
        """The record's examples; ``report`` counts the record and what happened to it."""
        fmt = self.format
        report.records += 1
        report.ignored_columns.update(c for c in record.data if c not in self.claimed)
        extra = validate_columns(record, self.fields) if self.fields is not None else {}
        record, groups = self.groups(record)
        examples = []
        for group in groups:
            example = tokenize_group(self.tokenizer, record, group)
            taken = sorted(extra.keys() & example.keys())
            if taken:
                raise DataError(
                    f"data format {fmt.name!r} gives the example a value named {taken[0]!r}, "
                    "which is also one of the objective's fields: rename the field",
                    source=record.source,
                    location=record.location,
                )
            example.update(extra)
            example["record"] = record.location  # named when the example's loss is not finite
            try:
                report.truncated += _truncate(example, self.max_length, self.truncation, record)
            except _Skip as skip:
                report.skipped[str(skip)] += 1
                continue
            examples.append(example)
        report.examples += len(examples)
        return examples


def tokenize_records(
    records: list[Record],
    data_format: str | DataFormat,
    tokenizer: Any,
    max_length: int,
    truncation: str,
    split: str,
    fields: type[BaseModel] | None = None,
) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenise every record in this process and hold the examples in a list (small data and
    tests; a run builds a memory-mapped store through ``align.data.build``). Errors name file,
    record and field; drops are counted.

    ``data_format``: a registered ``DataFormat`` (or a first-party format's name). ``fields``:
    the objective's extra fields, validated and stored in every example of the record.
    """
    tokenise = RecordTokenizer(data_format, tokenizer, max_length, truncation, fields)
    report = DataReport(split=split)
    examples = []
    for record in records:
        examples += tokenise.examples(record, report)
    if not examples:
        raise no_examples(report, records[0].source if records else None)
    return examples, report


def no_examples(report: DataReport, source: str | None) -> DataError:
    return DataError(f"no usable examples ({report.summary()})", source=source)
