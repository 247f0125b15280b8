"""Loading causal language models the one safe way: safetensors weights only, float32, remote
code only when the user asked for it."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError


def load_causal_lm(path: str, trust_remote_code: bool, role: str = "model", **extra: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained``; a failure names the ``role`` and the path.

    ``extra`` adds or overrides ``from_pretrained`` arguments (``quantization_config``, …)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"use_safetensors": True, "dtype": torch.float32, **extra}
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {role} {path!r}: {exc}") from None
