"""The first-party data formats, registered through the same ``align_register_formats`` hook a
plugin's format uses.

Column names follow TRL: ``prompt``/``completion``, ``messages`` or ``text``
(``prompt_completion``); ``prompt``/``chosen``/``rejected`` (``preference``);
``prompt``/``completion``/``label`` (``feedback``; prompt/chosen/rejected records are split into
a desirable and an undesirable example, as TRL's ``unpair_preference_dataset`` does); and
``prompt``/``completions``/``scores`` or ``ranks`` (``ranked``: a prompt with N ≥ 2 answers);
``prompt`` alone (``prompt_only``: what an on-policy objective samples completions for, as
TRL's prompt-only datasets).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..plugins.api import DataFormat, Group
from .batching import every_sequence_batch, paired_batch, sequence_batch
from .records import Record


def _require(record: Record, *names: str) -> None:
    for name in names:
        if name not in record.data or record.data[name] is None:
            present = ", ".join(sorted(record.data)) or "none"
            raise record.error(f"missing field (fields present: {present})", name)


def prompt_id(prompt: Any) -> str:
    """Tells examples of one prompt from others whatever truncation does to their tokens."""
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# -- prompt_completion -------------------------------------------------------------------------
def _prompt_completion(record: Record) -> Group:
    data = record.data
    if "messages" in data:
        return Group(None, {"": data["messages"]}, fields={"": "messages"})
    if "prompt" in data or "completion" in data:
        _require(record, "prompt", "completion")
        return Group(data["prompt"], {"": data["completion"]})
    if "text" in data:
        return Group(None, {"": data["text"]}, fields={"": "text"})
    present = ", ".join(sorted(data)) or "none"
    raise record.error(
        f"expected fields prompt and completion, messages, or text; fields present: {present}"
    )


# -- preference ----------------------------------------------------------------------------------
def _preference(record: Record) -> Group:
    _require(record, "prompt", "chosen", "rejected")
    data = record.data
    return Group(data["prompt"], {"chosen_": data["chosen"], "rejected_": data["rejected"]})


def _preference_batch(examples: list[dict], pad_token_id: int, packed: bool) -> dict[str, Any]:
    """``[chosen; rejected]`` rows: ``0..n-1`` chosen, ``n..2n-1`` rejected."""
    if not packed:
        return paired_batch(examples, pad_token_id)
    from .packing import pack_in_order

    n = len(examples)
    groups = [
        [(e[f"{side}_input_ids"], e[f"{side}_completion_mask"]) for side in ("chosen", "rejected")]
        for e in examples
    ]
    return pack_in_order(groups, [[i, n + i] for i in range(n)], pad_token_id)


# -- feedback ------------------------------------------------------------------------------------
def _feedback(record: Record) -> Group | list[Group]:
    data = record.data
    if "completion" not in data and "label" not in data and "chosen" in data:
        _require(record, "prompt", "chosen", "rejected")
        return [
            Group(
                data["prompt"],
                {"": data[side]},
                values={"label": side == "chosen", "prompt_id": prompt_id(data["prompt"])},
                fields={"": side},
            )
            for side in ("chosen", "rejected")
        ]
    _require(record, "prompt", "completion", "label")
    label = data["label"]
    if record.from_text and isinstance(label, str) and label.lower() in ("true", "false"):
        label = label.lower() == "true"
    if not isinstance(label, bool):
        raise record.error(f"expected a boolean (true = desirable), got {label!r}", "label")
    values = {"label": label, "prompt_id": prompt_id(data["prompt"])}
    return Group(data["prompt"], {"": data["completion"]}, values=values)


def _feedback_batch(examples: list[dict], pad_token_id: int, packed: bool) -> dict[str, Any]:
    import torch

    batch = every_sequence_batch(examples, pad_token_id, packed)
    batch["labels"] = torch.tensor([bool(e["label"]) for e in examples])
    return batch


# -- ranked --------------------------------------------------------------------------------------
class RankedRecord(BaseModel):
    """A prompt with N ≥ 2 answers, each with a score (higher is better) or a rank (1 is best)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # a NaN score ranks nothing

    prompt: str | list[dict[str, Any]]
    completions: list[str | list[dict[str, Any]]] = Field(min_length=2)
    scores: list[float] | None = None
    ranks: list[int] | None = None

    @model_validator(mode="after")
    def _scored(self) -> RankedRecord:
        given = [name for name in ("scores", "ranks") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give either scores (higher is better) or ranks (1 is best)")
        values = getattr(self, given[0])
        if len(values) != len(self.completions):
            raise ValueError(
                f"{given[0]} has {len(values)} values for {len(self.completions)} completions"
            )
        return self


def _ranked(record: Record) -> Group:
    data = record.data
    completions = data["completions"]
    ranks = data.get("ranks")
    scores = data["scores"] if ranks is None else [-float(r) for r in ranks]
    return Group(
        data["prompt"],
        {f"completion{i}_": answer for i, answer in enumerate(completions)},
        values={"scores": [float(s) for s in scores]},
        fields={f"completion{i}_": f"completions[{i}]" for i in range(len(completions))},
    )


def ranked_prefixes(example: dict[str, Any]) -> list[str]:
    """An example's answers in order: ``completion0_``, ``completion1_``, …"""
    count = sum(1 for key in example if key.startswith("completion") and key.endswith("input_ids"))
    return [f"completion{i}_" for i in range(count)]


def _ranked_batch(examples: list[dict], pad_token_id: int, packed: bool) -> dict[str, Any]:
    """Every answer a row (sequence), example by example: example 0's answers in record order,
    then example 1's, …; ``scores`` (float) and ``group`` (the example of each sequence, 0..n-1)
    per sequence. Packed: each example's answers share its prompt."""
    import torch

    sequences, scores, group = [], [], []
    for index, example in enumerate(examples):
        prefixes = ranked_prefixes(example)
        sequences.append(
            [(example[f"{p}input_ids"], example[f"{p}completion_mask"]) for p in prefixes]
        )
        scores += example["scores"]
        group += [index] * len(prefixes)
    if packed:
        from .packing import pack

        batch = pack(sequences, pad_token_id)
    else:
        rows = [
            {"input_ids": ids, "completion_mask": mask} for seqs in sequences for ids, mask in seqs
        ]
        batch = sequence_batch(rows, pad_token_id)
    batch["scores"] = torch.tensor(scores, dtype=torch.float32)
    batch["group"] = torch.tensor(group, dtype=torch.long)
    return batch


# -- prompt_only ---------------------------------------------------------------------------------
def _prompt_only(record: Record) -> Group:
    _require(record, "prompt")
    return Group(record.data["prompt"], {}, values={"prompt": record.data["prompt"]})


def _samples(kind: str) -> tuple[dict[str, Any], ...]:
    sums = [(1, 2), (10, 20), (3, 4), (7, 30)]
    if kind == "prompt_completion":
        return tuple(
            {
                "prompt": f"What is {a} + {b}? ",
                "completion": f"{a} + {b} = {a + b}." + " ok" * (a % 3),
            }
            for a, b in sums
        )
    if kind == "preference":
        return tuple(
            {
                "prompt": f"What is {a} + {b}? ",
                "chosen": f"{a + b}." + " ok" * (a % 3),
                "rejected": "No.",
            }
            for a, b in sums
        )
    if kind == "feedback":
        return tuple(
            {
                "prompt": f"What is {a} + {b}? ",
                "completion": f"{a + b}." if a % 2 else "No.",
                "label": a % 2 == 1,
            }
            for a, b in [(1, 2), (2, 20), (3, 4), (8, 30)]
        )
    if kind == "prompt_only":
        return tuple(
            {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": a + b}
            for a, b in sums
        )
    return tuple(
        {
            "prompt": f"What is {a} + {b}? ",
            "completions": [f"{a + b}." + " ok" * (a % 3), "No.", f"{a + b + 1}?"][: 2 + a % 2],
            "scores": [2.0, 0.0, 1.0][: 2 + a % 2],
        }
        for a, b in sums
    )


FORMATS: Sequence[DataFormat] = (
    DataFormat(
        "prompt_completion",
        "prompt/completion, messages (chat), or text records",
        _prompt_completion,
        columns=("prompt", "completion", "messages", "text"),
        samples=_samples("prompt_completion"),
    ),
    DataFormat(
        "preference",
        "prompt/chosen/rejected records (strings or message lists)",
        _preference,
        columns=("prompt", "chosen", "rejected"),
        batch=_preference_batch,
        samples=_samples("preference"),
    ),
    DataFormat(
        "feedback",
        "prompt/completion/label records (label a JSON boolean, true = desirable); "
        "prompt/chosen/rejected records are split into a desirable and an undesirable example",
        _feedback,
        columns=("prompt", "completion", "label", "chosen", "rejected"),
        batch=_feedback_batch,
        samples=_samples("feedback"),
    ),
    DataFormat(
        "ranked",
        "prompt/completions/scores records: N ≥ 2 answers to one prompt, each scored (higher "
        "is better) or ranked (ranks, 1 is best)",
        _ranked,
        schema=RankedRecord,
        batch=_ranked_batch,
        samples=_samples("ranked"),
    ),
    DataFormat(
        "prompt_only",
        "prompt records (a string or a list of chat messages) for on-policy objectives, which "
        "sample the completions; other columns are the rewards' fields (answer, say)",
        _prompt_only,
        columns=("prompt",),
        samples=_samples("prompt_only"),
    ),
)
BUILTIN = {fmt.name: fmt for fmt in FORMATS}


def default_batch(
    data_format: str | DataFormat,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    packed: bool = False,
) -> dict[str, Any]:
    """The core's batch for a data format (a first-party one's name, or a ``DataFormat``), as
    the loss gets it when the objective's plugin builds none; ``packed``: padding-free, the same
    sequences in the same order."""
    fmt = BUILTIN[data_format] if isinstance(data_format, str) else data_format
    if fmt.batch is None:
        return every_sequence_batch(list(examples), pad_token_id, packed)
    return fmt.batch(list(examples), pad_token_id, packed)


def align_register_formats(register: Any) -> None:
    """The core's own registration (the registry calls it as it calls a plugin's hook)."""
    for fmt in FORMATS:
        register(fmt)
