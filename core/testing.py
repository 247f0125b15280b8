"""The conformance suites for plugins (``from align.testing import ObjectiveConformance,
RewardConformance, FormatConformance``); they live in ``align.plugins.testing``,
``align.plugins.reward_conformance`` and ``align.plugins.format_conformance``."""

from .plugins.format_conformance import FormatConformance
from .plugins.reward_conformance import RewardConformance
from .plugins.testing import (
    SAMPLE_RECORDS,
    ObjectiveConformance,
    registered,
    reset_accelerate,
    unfused_flex_attention,
)

__all__ = [
    "SAMPLE_RECORDS",
    "FormatConformance",
    "ObjectiveConformance",
    "RewardConformance",
    "registered",
    "reset_accelerate",
    "unfused_flex_attention",
]
