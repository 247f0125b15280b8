"""align: an extensible fine-tuning framework. Objectives are plugins; this is the core.

Plugins import only from here. Names that need torch are loaded on first use, so importing
``align`` (and therefore loading every plugin) stays cheap. ``align.train`` is the Python API
(:mod:`align.api`): it imports torch when a run starts.
"""

from __future__ import annotations

import importlib
from typing import Any

import pluggy

from .data.batching import pad, paired_batch, sequence_batch, sequence_token_counts
from .data.formats import default_batch
from .data.records import Record
from .data.tokenize import (
    Tokenized,
    TokenizeError,
    tokenize_conversation,
    tokenize_prompt_completion,
    tokenize_text,
)
from .errors import AlignError, ConfigError, DataError, PluginError
from .plugins.api import (
    DataFormat,
    Extreme,
    Fields,
    GenerationRequest,
    Generator,
    Group,
    LossOutput,
    NoOptions,
    Objective,
    Options,
    Preset,
    Reward,
    Sampling,
    Section,
)
from .rollout.rewards import completion_text
from .run import Run

hookimpl = pluggy.HookimplMarker("align")

_LAZY = {
    "forward_logps": "model.logprobs",
    "token_logps": "model.logprobs",
    "TokenLogps": "model.logprobs",
    "sequence_scores": "model.scores",
    "forward_hidden": "model.logprobs",
    "Teacher": "reference.teacher",
    "group_statistics": "rollout.groups",
    "round_mean_std": "rollout.groups",
    "pack": "data.packing",
    "Reference": "reference",
    "MetricSums": "loop.metrics",
    "Examples": "data.store",
    "ListExamples": "data.store",
    "train": "api",
    "TrainResult": "api",
    "compare": "comparison",
    "ComparisonResult": "comparison",
    "RunStopped": "loop.stopping",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'align' has no attribute {name!r}")


__all__ = [
    "DataFormat",
    "Extreme",
    "Fields",
    "GenerationRequest",
    "Generator",
    "Group",
    "Record",
    "AlignError",
    "ConfigError",
    "DataError",
    "LossOutput",
    "NoOptions",
    "Objective",
    "Options",
    "PluginError",
    "Preset",
    "Reward",
    "Run",
    "Sampling",
    "Section",
    "Tokenized",
    "TokenizeError",
    "completion_text",
    "default_batch",
    "hookimpl",
    "pad",
    "paired_batch",
    "sequence_batch",
    "sequence_token_counts",
    "tokenize_conversation",
    "tokenize_prompt_completion",
    "tokenize_text",
    *_LAZY,
]
