"""Third-party messages that tell an align user nothing, silenced where they come from.

Each entry names one message of one library, matched exactly; every other warning and log
record still shows (``warnings.filters`` gains only the entries below). Applied at the start of
every run's set-up, from the command line or the Python API, and when ``align chat`` or
``align generate`` loads a model.

- DeepSpeed's ``Setting accelerator to CPU. If you have GPU or other accelerator, we were unable
  to detect it.``: logged (on stdout) by ``deepspeed.accelerator.real_accelerator`` when
  ``deepspeed`` is imported on a machine where it finds no GPU; Accelerate imports it whenever
  it is installed (the test extras install it), to unwrap the model it saves. It says nothing
  to the user: Accelerate, not DeepSpeed, chose the device, and the banner names the engine.
  Dropped by a filter on DeepSpeed's ``DeepSpeed`` logger (``$DS_ACCELERATOR=cpu`` would silence
  it too, but would also stop DeepSpeed from finding an XPU, NPU or MPS device).
- transformers' ``FutureWarning: `is_gradient_checkpointing` is deprecated``: raised in
  ``transformers.modeling_utils`` when PEFT (``peft_model.py``) wraps a model in a LoRA adapter
  and asks for the old property name; nothing the user wrote calls it.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, category, module regex) of the warnings a run ignores.
IGNORED_WARNINGS = (
    (
        r"`is_gradient_checkpointing` is deprecated",
        FutureWarning,
        r"transformers\.modeling_utils$",
    ),
)
# logger name -> the start of the one message of it that a run drops.
DROPPED_RECORDS = {"DeepSpeed": "Setting accelerator to CPU."}


class DropMessage(logging.Filter):
    """Drops a logger's records whose message starts with ``prefix``; keeps every other."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_third_party() -> None:
    """Silence the messages listed above (again: each entry is added once)."""
    for message, category, module in IGNORED_WARNINGS:
        # filterwarnings replaces an identical entry rather than adding a second one
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in DROPPED_RECORDS.items():
        logger = logging.getLogger(name)  # the logger DeepSpeed configures when imported
        if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
