"""Reward functions: the first-party ones (``addition``, ``length``, ``format``), registered
through the same ``align_register_rewards`` hook as a plugin's, and the run's chosen set, which
scores a round's completions and says which reward failed on which record.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from ..errors import PluginError
from ..plugins.api import Fields, Options, Reward
from .model_reward import ModelReward

# -- first-party rewards -----------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """A completion's text: the string, or the content of its messages (chat prompts)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class AdditionFields(Fields):
    answer: float = Field(description="The correct sum.")


class AdditionOptions(Options):
    working: bool = Field(
        False,
        description="Also require the numbers before the last to be the question's, in order "
        '("7 + 12 = 19." for "What is 7 + 12?"; a bare "19." passes): a policy rewarded for '
        "the final number alone may learn to restate the question wrongly.",
    )


def addition(
    completions: Sequence[Any],
    answer: Sequence[float],
    prompts: Sequence[Any] | None = None,
    options: Any = None,
) -> list[float]:
    """1.0 when the completion's last number equals ``answer``, else 0.0 (the demo's task:
    "What is 7 + 12?" → "7 + 12 = 19."); with ``working``, the numbers before it must be the
    question's (the prompt's numbers, in order) or none."""
    working = bool(options is not None and options.working)
    rewards = []
    for i, (completion, expected) in enumerate(zip(completions, answer, strict=True)):
        numbers = [float(n) for n in _NUMBER.findall(completion_text(completion))]
        right = bool(numbers) and numbers[-1] == float(expected)
        if right and working and numbers[:-1]:
            asked = [float(n) for n in _NUMBER.findall(_prompt_text(prompts[i]))]
            right = numbers[:-1] == asked
        rewards.append(float(right))
    return rewards


def _prompt_text(prompt: Any) -> str:
    """A prompt's text: the string, or its last user message (chat prompts)."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    return str((users or prompt)[-1].get("content", ""))


class LengthOptions(Options):
    max_length: int | None = Field(
        None, ge=1, description="L_max in tokens; default: the run's max_completion_length."
    )
    cache: int = Field(
        32, ge=0, description="L_cache: the soft zone before L_max where the penalty grows."
    )


def length(completion_ids: Sequence[Sequence[int]], options: Any, config: Any) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), as TRL's
    ``get_soft_overlong_punishment``: 0 up to ``L_max − L_cache`` tokens, then falling
    linearly to −1 at ``L_max``, and −1 beyond."""
    top = options.max_length or config.max_completion_length
    start = top - options.cache
    rewards = []
    for ids in completion_ids:
        n = len(ids)
        if n <= start:
            rewards.append(0.0)
        elif n <= top:
            rewards.append((start - n) / options.cache)
        else:
            rewards.append(-1.0)
    return rewards


THINK_ANSWER = r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$"


class FormatOptions(Options):
    pattern: str = Field(
        THINK_ANSWER,
        description="Regular expression the whole completion must match (re.DOTALL); "
        "default: <think>…</think><answer>…</answer>, as Open-R1's format reward.",
    )

    def model_post_init(self, context: Any) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern is not a regular expression: {exc}") from None


def format_reward(completions: Sequence[Any], options: Any) -> list[float]:
    """1.0 when the completion matches ``pattern`` as a whole, else 0.0."""
    pattern = re.compile(options.pattern, re.DOTALL)
    return [float(pattern.fullmatch(completion_text(c)) is not None) for c in completions]


REWARDS = (
    Reward(
        "addition",
        "1 when the completion's last number is the record's `answer` (the demo's sums), else "
        "0; `working`: and the numbers before it are the question's",
        addition,
        fields=AdditionFields,
        options=AdditionOptions,
    ),
    Reward(
        "length",
        "DAPO's soft overlong punishment: 0, falling to -1 over the last `cache` tokens "
        "before `max_length`",
        length,
        options=LengthOptions,
    ),
    Reward(
        "format",
        "1 when the whole completion matches the regular expression `pattern`, else 0",
        format_reward,
        options=FormatOptions,
    ),
)


def align_register_rewards(register: Any) -> None:
    """The core's own registration (the registry calls it as it calls a plugin's hook)."""
    for reward in REWARDS:
        register(reward)


# -- the run's rewards ---------------------------------------------------------------------------


@dataclass
class ChosenReward:
    reward: Reward
    weight: float
    options: Any
    label: str  # the plugin that registered it, for errors

    @property
    def name(self) -> str:
        return self.reward.name


class RewardSet:
    """The rewards a run chose, with their weights and options."""

    def __init__(self, chosen: list[ChosenReward], config: Any, data: str | None) -> None:
        self.chosen, self.config, self.data = chosen, config, data
        self.names = [c.name for c in chosen]
        self.weights = [c.weight for c in chosen]

    def load_models(self, accelerator: Any) -> None:
        """Load the run's reward models (``--reward model:PATH``) onto the policy's device,
        once: a model already loaded is kept."""
        for c in self.chosen:
            if isinstance(c.reward.function, ModelReward):
                c.reward.function.load(self.config, accelerator)

    def field_names(self) -> list[str]:
        from ..data.fields import column_names

        names: list[str] = []
        for c in self.chosen:
            for name in column_names(c.reward.fields) if c.reward.fields is not None else ():
                if name not in names:
                    names.append(name)
        return names

    def score(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        fields: dict[str, list[Any]],
        records: list[str],
    ) -> list[list[float]]:
        """One row per reward: its value for every completion. ``records`` names each
        completion's record, for errors."""
        values = []
        for c in self.chosen:
            arguments = {
                "prompts": prompts,
                "completions": completions,
                "completion_ids": completion_ids,
                "options": c.options,
                "config": self.config,
                **fields,
            }
            values.append(self._call(c, arguments, records))
        return values

    def _call(self, c: ChosenReward, arguments: dict[str, Any], records: list[str]) -> list[float]:
        """The reward's values, checked: one finite number (int or float, a numpy or a one-value
        torch number included; not a boolean, a string or None) per completion."""
        function = c.reward.function
        taken = _accepted(function, arguments)
        try:
            returned = function(**taken)
        except Exception as exc:
            where = self._first_failing(c, arguments, records)
            raise PluginError(
                f"reward {c.name!r} ({c.label}) raised {type(exc).__name__}: {exc}{where}"
            ) from exc
        count = len(records)
        result = _values(returned)
        if result is None or len(result) != count:
            got = (
                f"{type(returned).__name__} {_short(returned)}"
                if result is None
                else f"{len(result)} values"
            )
            raise PluginError(
                f"reward {c.name!r} ({c.label}) returned {got} for {count} completions (of "
                f"{self._where(_span(records))}): it must return a list of one number per "
                "completion, in order"
            )
        out = []
        for value, record in zip(result, records, strict=True):
            number = _number(value)
            if number is None or not math.isfinite(number):
                raise PluginError(
                    f"reward {c.name!r} ({c.label}) returned {_short(value)} "
                    f"({type(value).__name__}) for a completion of {self._where(record)}: "
                    "rewards must be finite numbers (int or float; not a boolean, a string or "
                    "None)"
                )
            out.append(number)
        return out

    def _where(self, record: str) -> str:
        if self.data and record.startswith("["):  # a record given in memory: data[3]
            return f"{self.data}{record}"
        return f"{self.data}, {record}" if self.data else record

    def _first_failing(self, c: ChosenReward, arguments: dict[str, Any], records: list[str]) -> str:
        """Call the reward one completion at a time to name the record it fails on."""
        per_item = {"prompts", "completions", "completion_ids", *self.field_names()}
        for i, record in enumerate(records):
            one = {k: ([v[i]] if k in per_item else v) for k, v in arguments.items()}
            try:
                c.reward.function(**_accepted(c.reward.function, one))
            except Exception:
                return f" on a completion of {self._where(record)}"
        return ""


def _values(returned: Any) -> list[Any] | None:
    """A reward's returned values as a list (a list, a tuple, a numpy array or a torch tensor
    of one dimension, any other iterable but a string or a mapping), or None."""
    if isinstance(returned, str | bytes | dict) or returned is None:
        return None
    if getattr(returned, "ndim", 1) != 1:  # a 0-d array or tensor is one value, not a list
        return None
    try:
        return list(returned)
    except TypeError:
        return None


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (int, float, a numpy one, a one-value torch
    tensor of a number dtype), else None: a boolean, a string or None is not a reward."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy
    if kind is not None and getattr(value, "ndim", 0) == 0:
        return float(value) if kind in "iuf" else None
    dtype = getattr(value, "dtype", None)  # torch
    if dtype is not None and hasattr(value, "numel") and value.numel() == 1:
        import torch

        if not dtype.is_complex and dtype != torch.bool:
            return float(value.item())
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _span(records: list[str], shown: int = 5) -> str:
    """The records of a call's completions, each once: ``line 1, line 4 and 2 more``."""
    distinct = list(dict.fromkeys(records))
    more = f" and {len(distinct) - shown} more" if len(distinct) > shown else ""
    return ", ".join(distinct[:shown]) + more if distinct else "no record"


def _accepted(function: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``function`` takes: all of them if it has ``**kwargs``."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return arguments
    names = {p.name for p in parameters}
    return {k: v for k, v in arguments.items() if k in names}
