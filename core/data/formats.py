"""The data formats objectives declare, turned into tokenised examples with a report.

Column names follow TRL: ``prompt``/``completion``, ``messages`` or ``text``
(``prompt_completion``); ``prompt``/``chosen``/``rejected`` (``preference``);
``prompt``/``completion``/``label`` (``feedback``; prompt/chosen/rejected records are split into
a desirable and an undesirable example). Over-long sequences follow the truncation
policy, and every truncated or skipped example is counted in the report.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .records import Record
from .tokenize import (
    Tokenized,
    TokenizeError,
    check_messages,
    tokenize_conversation,
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

    def summary(self) -> str:
        text = f"{self.split}: {self.records} records → {self.examples} examples"
        if self.truncated:
            text += f"; {self.truncated} truncated"
        for reason, count in sorted(self.skipped.items()):
            text += f"; {count} skipped ({reason})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "examples": self.examples,
            "truncated": self.truncated,
            "skipped": dict(self.skipped),
        }


class _Skip(Exception):
    """An example dropped by the truncation policy (counted, never silent)."""


def _string(record: Record, name: str, allow_empty: bool = True) -> str:
    if name not in record.data or record.data[name] is None:
        raise record.error("missing field", name)
    value = record.data[name]
    if not isinstance(value, str):
        raise record.error(f"expected a string, got {type(value).__name__}", name)
    if not allow_empty and not value.strip():
        raise record.error("is empty", name)
    return value


def _require(record: Record, *names: str) -> None:
    for name in names:
        if name not in record.data or record.data[name] is None:
            present = ", ".join(sorted(record.data)) or "none"
            raise record.error(f"missing field (fields present: {present})", name)


def _prompt_and_answer(tokenizer: Any, record: Record, answer: str) -> Tokenized:
    """A prompt with one answer, both strings or both message lists."""
    prompt, value = record.data["prompt"], record.data[answer]
    if isinstance(prompt, list) or isinstance(value, list):
        for name, val in (("prompt", prompt), (answer, value)):
            if not isinstance(val, list):
                raise record.error("expected a list of messages, like the other field", name)
            check_messages(val, name)  # so a bad message is named within its own field
        return tokenize_conversation(
            tokenizer, prompt + value, trained_from=len(prompt), field=answer
        )
    _string(record, "prompt")
    return tokenize_prompt_completion(tokenizer, prompt, _string(record, answer, False))


def _prompt_completion(tokenizer: Any, record: Record) -> dict[str, Any]:
    data = record.data
    if "messages" in data:
        tok = tokenize_conversation(tokenizer, data["messages"])
    elif "prompt" in data or "completion" in data:
        _require(record, "prompt", "completion")
        tok = _prompt_and_answer(tokenizer, record, "completion")
    elif "text" in data:
        tok = tokenize_text(tokenizer, _string(record, "text", allow_empty=False))
    else:
        present = ", ".join(sorted(data)) or "none"
        raise record.error(
            f"expected fields prompt and completion, messages, or text; fields present: {present}"
        )
    return {"input_ids": tok.input_ids, "completion_mask": tok.completion_mask}


def _preference(tokenizer: Any, record: Record) -> dict[str, Any]:
    _require(record, "prompt", "chosen", "rejected")
    example = {}
    for side in ("chosen", "rejected"):
        tok = _prompt_and_answer(tokenizer, record, side)
        example[f"{side}_input_ids"] = tok.input_ids
        example[f"{side}_completion_mask"] = tok.completion_mask
    return example


def _feedback(tokenizer: Any, record: Record) -> list[dict[str, Any]]:
    """An unpaired example; or, from a prompt/chosen/rejected record, a desirable (chosen) and an
    undesirable (rejected) example, as TRL's ``unpair_preference_dataset`` does."""
    data = record.data
    if "completion" not in data and "label" not in data and "chosen" in data:
        _require(record, "prompt", "chosen", "rejected")
        return [
            _labelled(tokenizer, record, side, side == "chosen") for side in ("chosen", "rejected")
        ]
    _require(record, "prompt", "completion", "label")
    label = data["label"]
    if record.from_text and isinstance(label, str) and label.lower() in ("true", "false"):
        label = label.lower() == "true"
    if not isinstance(label, bool):
        raise record.error(f"expected a boolean (true = desirable), got {label!r}", "label")
    return [_labelled(tokenizer, record, "completion", label)]


def _labelled(tokenizer: Any, record: Record, answer: str, label: bool) -> dict[str, Any]:
    """A feedback example; ``prompt_id`` tells examples of one prompt from others whatever
    truncation did to their tokens (KTO pairs each example with another prompt's answer)."""
    tok = _prompt_and_answer(tokenizer, record, answer)
    prompt = json.dumps(record.data["prompt"], sort_keys=True, ensure_ascii=False)
    return {
        "input_ids": tok.input_ids,
        "completion_mask": tok.completion_mask,
        "label": label,
        "prompt_id": hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest(),
    }


FORMATS: dict[str, Callable[[Any, Record], dict[str, Any] | list[dict[str, Any]]]] = {
    "prompt_completion": _prompt_completion,
    "preference": _preference,
    "feedback": _feedback,
}


def _truncate(example: dict[str, Any], max_length: int, policy: str, record: Record) -> bool:
    """Apply the policy to every sequence of the example in place; True if anything was cut.

    ``keep_end`` removes the same number of leading tokens from every sequence of the example,
    so chosen and rejected keep one and the same (shortened) prompt.
    """
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


def tokenize_records(
    records: list[Record],
    data_format: str,
    tokenizer: Any,
    max_length: int,
    truncation: str,
    split: str,
) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenise every record; errors name file, record and field; drops are counted."""
    build = FORMATS[data_format]
    report = DataReport(split=split, records=len(records))
    examples = []
    for record in records:
        try:
            built = build(tokenizer, record)
        except TokenizeError as exc:
            raise record.error(str(exc), exc.field) from None
        for example in built if isinstance(built, list) else [built]:
            example["record"] = record.location  # named when the example's loss is not finite
            try:
                report.truncated += _truncate(example, max_length, truncation, record)
            except _Skip as skip:
                report.skipped[str(skip)] += 1
                continue
            examples.append(example)
    report.examples = len(examples)
    if not examples:
        raise DataError(f"no usable examples ({report.summary()})", source=records[0].source)
    return examples, report
