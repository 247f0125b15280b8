"""The first-party data formats, registered through the same ``align_register_formats`` hook a
plugin's format uses.

Column names follow TRL: ``prompt``/``completion``, ``messages`` or ``text``
(``prompt_completion``); ``conversations`` of ``from``/``value`` turns and ``system``
(``sharegpt``, as LLaMA-Factory and axolotl read it); ``prompt``/``chosen``/``rejected``
(``preference``; without ``prompt``, chosen and rejected's common start);
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
from .records import Record
from .shapes import SHAPES, ranked_prefixes  # noqa: F401 (plugins read ranked_prefixes here)


def _require(record: Record, *names: str) -> None:
    for name in names:
        if name not in record.data:
            present = ", ".join(sorted(record.data)) or "none"
            raise record.error(f"missing field (fields present: {present})", name)
        if record.data[name] is None:
            raise record.error("is null", name)


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
def implicit_prompt(record: Record) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a preference record: its ``prompt`` when it has one,
    else the common start of ``chosen`` and ``rejected`` (TRL's ``extract_prompt``: messages up
    to the first that differs, or text up to the first differing character, a space before it
    going with the answers)."""
    data = record.data
    if "prompt" in data:
        _require(record, "prompt", "chosen", "rejected")
        return data["prompt"], data["chosen"], data["rejected"]
    _require(record, "chosen", "rejected")
    chosen, rejected = data["chosen"], data["rejected"]
    if not (
        (isinstance(chosen, str) and isinstance(rejected, str))
        or (isinstance(chosen, list) and isinstance(rejected, list))
    ):
        raise record.error(
            f"with no prompt field, chosen and rejected must both be text or both be messages "
            f"(the prompt is their common start), got {type(chosen).__name__} and "
            f"{type(rejected).__name__}",
            "rejected",
        )
    shared = next(
        (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
        min(len(chosen), len(rejected)),
    )
    if isinstance(chosen, str) and shared > 0 and chosen[shared - 1] == " ":
        shared -= 1
    if shared == 0:
        raise record.error(
            "has no prompt field, and chosen and rejected have no common start to take as the "
            "prompt: add a prompt field",
            "chosen",
        )
    if shared >= min(len(chosen), len(rejected)):
        raise record.error(
            "has no prompt field, and one of chosen and rejected is the other's start: nothing "
            "is left of it as an answer after the common prompt",
            "chosen" if len(chosen) <= len(rejected) else "rejected",
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _preference(record: Record) -> Group:
    prompt, chosen, rejected = implicit_prompt(record)
    return Group(prompt, {"chosen_": chosen, "rejected_": rejected})


# -- feedback ------------------------------------------------------------------------------------
def _feedback(record: Record) -> Group | list[Group]:
    data = record.data
    if "completion" not in data and "label" not in data and "chosen" in data:
        prompt, chosen, rejected = implicit_prompt(record)
        return [
            Group(
                prompt,
                {"": answer},
                values={"label": side == "chosen", "prompt_id": prompt_id(prompt)},
                fields={"": side},
            )
            for side, answer in (("chosen", chosen), ("rejected", rejected))
        ]
    _require(record, "prompt", "completion", "label")
    label = data["label"]
    if record.from_text and isinstance(label, str) and label.lower() in ("true", "false"):
        label = label.lower() == "true"
    if not isinstance(label, bool):
        raise record.error(f"expected a boolean (true = desirable), got {label!r}", "label")
    values = {"label": label, "prompt_id": prompt_id(data["prompt"])}
    return Group(data["prompt"], {"": data["completion"]}, values=values)


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


# -- prompt_only ---------------------------------------------------------------------------------
def _prompt_only(record: Record) -> Group:
    _require(record, "prompt")
    return Group(record.data["prompt"], {}, values={"prompt": record.data["prompt"]})


# -- sharegpt ------------------------------------------------------------------------------------
# LLaMA-Factory's and axolotl's role tags (``from``) → chat roles; a function call is trained as
# the assistant's turn and an observation (a tool's output) is not, as LLaMA-Factory does.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "system": "system",
}


def _sharegpt_turn(record: Record, turn: Any, where: str) -> dict[str, str]:
    """One ``{"from", "value"}`` turn as a chat message; errors name ``where`` in the record."""
    from ..suggest import did_you_mean

    if not isinstance(turn, dict):
        raise record.error(
            f'expected a turn {{"from": …, "value": …}}, got {type(turn).__name__}', where
        )
    if "from" not in turn and "role" in turn:
        raise record.error(
            'missing field: a ShareGPT turn is {"from", "value"}; turns of role and content '
            "are chat messages (the messages column: --data-columns conversations=messages)",
            f"{where}.from",
        )
    for key in ("from", "value"):
        if turn.get(key) is None:
            raise record.error("missing field" if key not in turn else "is null", f"{where}.{key}")
    tag, value = turn["from"], turn["value"]
    role = SHAREGPT_ROLES.get(tag) if isinstance(tag, str) else None
    if role is None:
        raise record.error(
            f"unknown role tag {tag!r}.{did_you_mean(str(tag), SHAREGPT_ROLES)} Tags: "
            f"{', '.join(SHAREGPT_ROLES)}",
            f"{where}.from",
        )
    if not isinstance(value, str):
        raise record.error(f"expected a string, got {type(value).__name__}", f"{where}.value")
    return {"role": role, "content": value}


def sharegpt_messages(record: Record) -> list[dict[str, str]]:
    """A ShareGPT record's ``conversations`` (``from``/``value`` turns) and ``system`` as chat
    messages: the system prompt first (the ``system`` field, or a first ``system`` turn), then
    the turns, role tags mapped by :data:`SHAREGPT_ROLES`."""
    _require(record, "conversations")
    turns = record.data["conversations"]
    if not isinstance(turns, list) or not turns:
        raise record.error(
            f"expected a non-empty list of turns, got {type(turns).__name__}", "conversations"
        )
    messages = []
    for i, turn in enumerate(turns):
        message = _sharegpt_turn(record, turn, f"conversations[{i}]")
        if message["role"] == "system" and i > 0:
            raise record.error(
                "a system turn comes first or not at all", f"conversations[{i}].from"
            )
        messages.append(message)
    system = record.data.get("system")
    if system is not None and not isinstance(system, str):
        raise record.error(f"expected a string, got {type(system).__name__}", "system")
    if system:
        if messages[0]["role"] == "system":
            raise record.error(
                "the record has a system field and a first system turn: keep one", "system"
            )
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _sharegpt(record: Record) -> Group:
    return Group(None, {"": sharegpt_messages(record)}, fields={"": "conversations"})


def _sharegpt_prompt(record: Record) -> list[dict[str, str]]:
    """The conversation before the answers of a preference or feedback record: it ends with a
    turn the answer replies to (not the assistant's)."""
    messages = sharegpt_messages(record)
    if messages[-1]["role"] == "assistant":
        last = len(record.data["conversations"]) - 1
        raise record.error(
            "the conversation before the answers ends with the assistant's turn; the answers "
            "follow a human (or observation) turn",
            f"conversations[{last}].from",
        )
    return messages


def _sharegpt_answer(record: Record, name: str) -> list[dict[str, str]]:
    _require(record, name)
    message = _sharegpt_turn(record, record.data[name], name)
    if message["role"] != "assistant":
        raise record.error(
            f"the answer is the assistant's turn (gpt), got {record.data[name]['from']!r}",
            f"{name}.from",
        )
    return [message]


def _sharegpt_preference(record: Record) -> Group:
    _require(record, "conversations", "chosen", "rejected")
    prompt = _sharegpt_prompt(record)
    chosen = _sharegpt_answer(record, "chosen")
    rejected = _sharegpt_answer(record, "rejected")
    return Group(prompt, {"chosen_": chosen, "rejected_": rejected})


def _sharegpt_feedback(record: Record) -> Group:
    _require(record, "conversations", "kto_tag")
    label = record.data["kto_tag"]
    if not isinstance(label, bool):
        raise record.error(f"expected a boolean (true = desirable), got {label!r}", "kto_tag")
    messages = sharegpt_messages(record)
    last = len(record.data["conversations"]) - 1
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise record.error(
            "the last turn is the answer kto_tag labels: a gpt turn after the prompt",
            f"conversations[{last}].from",
        )
    prompt = messages[:-1]
    values = {"label": label, "prompt_id": prompt_id(prompt)}
    return Group(prompt, {"": messages[-1:]}, values=values, fields={"": f"conversations[{last}]"})


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
    if kind == "sharegpt":
        return (
            {
                "conversations": [
                    {"from": "human", "value": "What is 1 + 2?"},
                    {"from": "gpt", "value": "1 + 2 = 3."},
                ]
            },
            {
                "conversations": [
                    {"from": "human", "value": "What is 10 + 20?"},
                    {"from": "gpt", "value": "30."},
                    {"from": "human", "value": "And 3 + 4?"},
                    {"from": "gpt", "value": "3 + 4 = 7."},
                ],
                "system": "You add numbers.",
            },
            {
                "conversations": [
                    {"from": "system", "value": "Answer briefly."},
                    {"from": "human", "value": "What is 7 + 30?"},
                    {"from": "gpt", "value": "37."},
                ]
            },
        )
    if kind == "sharegpt_preference":
        return tuple(
            {
                "conversations": [{"from": "human", "value": f"What is {a} + {b}?"}],
                "chosen": {"from": "gpt", "value": f"{a} + {b} = {a + b}."},
                "rejected": {"from": "gpt", "value": f"It is {a + b + 2}."},
                **({"system": "You add numbers."} if a % 2 else {}),
            }
            for a, b in sums
        )
    if kind == "sharegpt_feedback":
        return tuple(
            {
                "conversations": [
                    {"from": "human", "value": f"What is {a} + {b}?"},
                    {"from": "gpt", "value": f"{a + b}." if a % 2 else "No."},
                ],
                "kto_tag": a % 2 == 1,
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


def _trained(kind: str) -> tuple[list[Any], ...]:
    """What each sample trains on: its sequences' trained text (FormatConformance checks it)."""
    samples = _samples(kind)
    if kind == "prompt_completion":
        return tuple([s["completion"]] for s in samples)
    if kind == "preference":
        return tuple([s["chosen"], s["rejected"]] for s in samples)
    if kind == "feedback":
        return tuple([s["completion"]] for s in samples)
    if kind == "ranked":
        return tuple(list(s["completions"]) for s in samples)
    if kind == "sharegpt":
        return tuple(
            [[t["value"] for t in s["conversations"] if t["from"] == "gpt"]] for s in samples
        )
    if kind == "sharegpt_preference":
        return tuple([s["chosen"]["value"], s["rejected"]["value"]] for s in samples)
    if kind == "sharegpt_feedback":
        return tuple([s["conversations"][-1]["value"]] for s in samples)
    return tuple([] for _ in samples)  # prompt_only: nothing is trained, completions are sampled


FORMATS: Sequence[DataFormat] = (
    DataFormat(
        "prompt_completion",
        "prompt/completion, messages (chat), or text records",
        _prompt_completion,
        shape="prompt_completion",
        columns=("prompt", "completion", "messages", "text"),
        detect=(("prompt", "completion"), ("messages",), ("text",)),
        samples=_samples("prompt_completion"),
        trained=_trained("prompt_completion"),
    ),
    DataFormat(
        "sharegpt",
        "ShareGPT conversations (LLaMA-Factory, axolotl): conversations of from/value turns "
        "(human, gpt, system, function_call, observation) and an optional system field; "
        "trained on the gpt turns",
        _sharegpt,
        shape="conversation",
        columns=("conversations", "system"),
        detect=(("conversations",),),
        samples=_samples("sharegpt"),
        trained=_trained("sharegpt"),
    ),
    DataFormat(
        "sharegpt_preference",
        "ShareGPT preference records (LLaMA-Factory's ranking data): the conversations before "
        "the answers, and chosen and rejected, each one gpt turn",
        _sharegpt_preference,
        shape="preference",
        columns=("conversations", "system", "chosen", "rejected"),
        detect=(("conversations", "chosen", "rejected"),),
        samples=_samples("sharegpt_preference"),
        trained=_trained("sharegpt_preference"),
    ),
    DataFormat(
        "sharegpt_feedback",
        "ShareGPT feedback records (LLaMA-Factory's KTO data): conversations whose last gpt "
        "turn is the answer, and kto_tag (a boolean, true = desirable)",
        _sharegpt_feedback,
        shape="feedback",
        columns=("conversations", "system", "kto_tag"),
        detect=(("conversations", "kto_tag"),),
        samples=_samples("sharegpt_feedback"),
        trained=_trained("sharegpt_feedback"),
    ),
    DataFormat(
        "preference",
        "prompt/chosen/rejected records (strings or message lists); without prompt, the "
        "common start of chosen and rejected is the prompt (TRL's implicit prompt)",
        _preference,
        shape="preference",
        columns=("prompt", "chosen", "rejected"),
        detect=(("chosen", "rejected"),),
        samples=_samples("preference"),
        trained=_trained("preference"),
    ),
    DataFormat(
        "feedback",
        "prompt/completion/label records (label a JSON boolean, true = desirable); "
        "prompt/chosen/rejected records are split into a desirable and an undesirable example",
        _feedback,
        shape="feedback",
        columns=("prompt", "completion", "label", "chosen", "rejected"),
        detect=(("prompt", "completion", "label"), ("chosen", "rejected")),
        samples=_samples("feedback"),
        trained=_trained("feedback"),
    ),
    DataFormat(
        "ranked",
        "prompt/completions/scores records: N ≥ 2 answers to one prompt, each scored (higher "
        "is better) or ranked (ranks, 1 is best)",
        _ranked,
        shape="ranked",
        schema=RankedRecord,
        samples=_samples("ranked"),
        trained=_trained("ranked"),
    ),
    DataFormat(
        "prompt_only",
        "prompt records (a string or a list of chat messages) for on-policy objectives, which "
        "sample the completions; other columns are the rewards' fields (answer, say)",
        _prompt_only,
        shape="prompt_only",
        columns=("prompt",),
        detect=(("prompt",),),
        samples=_samples("prompt_only"),
        trained=_trained("prompt_only"),
    ),
)
BUILTIN = {fmt.name: fmt for fmt in FORMATS}


def default_batch(
    shape: str | DataFormat,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    packed: bool = False,
) -> dict[str, Any]:
    """The core's batch for a data shape (its name, or a ``DataFormat``: its shape's batch, or
    for a shape of a plugin's own the format's ``batch``), as the loss gets it when the
    objective's plugin builds none; ``packed``: padding-free, the same sequences in the same
    order."""
    from .batching import every_sequence_batch

    if isinstance(shape, DataFormat):
        build = SHAPES[shape.shape].batch if shape.shape in SHAPES else shape.batch
    else:
        build = SHAPES[shape].batch
    return (build or every_sequence_batch)(list(examples), pad_token_id, packed)


def align_register_formats(register: Any) -> None:
    """The core's own registration (the registry calls it as it calls a plugin's hook)."""
    for fmt in FORMATS:
        register(fmt)
