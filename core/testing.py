"""The conformance suite for objective plugins (``from align.testing import
ObjectiveConformance``); it lives in ``align.plugins.testing``."""

from .plugins.testing import SAMPLE_RECORDS, ObjectiveConformance, registered, reset_accelerate

__all__ = ["SAMPLE_RECORDS", "ObjectiveConformance", "registered", "reset_accelerate"]
