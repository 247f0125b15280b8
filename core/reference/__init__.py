"""Reference log-probs for objectives that declare ``needs_reference``: the reference models
(``models``), the precomputed pass and its cache (``precompute``), choosing the mode at set-up
(``setup``) and ``--eval-deviation`` (``deviation``).

A loss hook receives a :class:`Reference` and calls ``reference.sequence_logps(batch, prefix)``.
"""

from .models import REFERENCE_ADAPTER, REFERENCE_MODES, AdapterReference, ModelReference, Reference

__all__ = [
    "REFERENCE_ADAPTER",
    "REFERENCE_MODES",
    "AdapterReference",
    "ModelReference",
    "Reference",
]
