"""A reward given as a plain Python function (``align.train(rewards=[fn])``), made into the same
:class:`align.Reward` a plugin registers, so it is called and checked as one: the same keyword
arguments, the same checks of what it returns (one finite number per completion), the same
errors naming the reward and the record.

The function is called with the arguments it names, as TRL calls its ``reward_funcs``:
``prompts``, ``completions``, ``completion_ids``, ``config`` (the run's core options),
``options`` (empty: a function has none), and record columns. A column is read when the
function names it as a parameter (``def f(completions, answer, **kwargs)``): every record must
then have it (a parameter with a default makes it optional), checked like an objective's
fields, and its annotation, when it is ``list[T]`` or ``Sequence[T]``, types each value
(``answer: list[float]``). A function that takes only ``**kwargs`` gets no columns: align keeps
and validates the columns a reward names, where TRL hands every column of the dataset over.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import typing
from collections.abc import Callable
from typing import Any

from pydantic import create_model

from ..errors import ConfigError
from ..plugins.api import Fields, Reward

# The arguments the core passes to every reward; any other parameter names a record column.
CORE_ARGUMENTS = ("prompts", "completions", "completion_ids", "options", "config")
# TRL passes these to its reward functions; align does not have them.
TRL_ONLY = ("trainer_state", "log_extra", "log_metric")
FUNCTION_LABEL = "a Python function"


def function_reward(function: Callable[..., Any], given_as: str) -> Reward:
    """``function`` as a :class:`Reward` named after it (``__name__``, as TRL names the metrics
    ``rewards/<name>/mean``); ``given_as`` names it in errors (``rewards[1]``)."""
    name = getattr(function, "__name__", None) or type(function).__name__
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        raise ConfigError(f"{given_as}: cannot read the signature of {name!r}") from None
    hints = _type_hints(function)
    columns: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise ConfigError(
                f"{given_as}: reward {name!r} takes {parameter.name!r} positionally only; "
                "rewards are called with keyword arguments (prompts, completions, ...)"
            )
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if parameter.name in CORE_ARGUMENTS:
            continue
        if parameter.name in TRL_ONLY and parameter.default is inspect.Parameter.empty:
            raise ConfigError(
                f"{given_as}: reward {name!r} needs {parameter.name!r}, which TRL passes and "
                "align does not; give it a default or take it through **kwargs"
            )
        if parameter.name in TRL_ONLY:
            continue
        value_type = _value_type(hints.get(parameter.name, Any))
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        columns[parameter.name] = (value_type, default)
    fields = create_model(f"{name}_columns", __base__=Fields, **columns) if columns else None
    doc = (inspect.getdoc(function) or "").strip().splitlines()
    description = doc[0] if doc else f"{FUNCTION_LABEL} ({_qualified(function)})"
    return Reward(name, description, function, fields=fields)


def function_weight(value: Any, given_as: str) -> float:
    """A weight of ``reward_weights``: a finite number, not a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{given_as}: a reward weight must be a finite number, got {value!r}")
    return float(value)


def _qualified(function: Any) -> str:
    module = getattr(function, "__module__", None) or "?"
    return f"{module}.{getattr(function, '__qualname__', type(function).__qualname__)}"


def _type_hints(function: Any) -> dict[str, Any]:
    """The function's annotations, resolved; none where they cannot be (a name defined later
    in a notebook): each column is then read as any value."""
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 (a bad annotation is the user's; the column stays untyped)
        return {}


def _value_type(annotation: Any) -> Any:
    """One record's value type from a parameter's annotation: ``list[T]`` or ``Sequence[T]``
    (one value per completion) gives ``T``; anything else, any value."""
    origin = typing.get_origin(annotation)
    sequences = (list, tuple, collections.abc.Sequence, typing.Sequence)
    if origin in sequences:
        args = typing.get_args(annotation)
        if args and args[0] is not Ellipsis:
            return args[0]
    return Any
