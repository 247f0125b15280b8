"""QLoRA loading: 4-bit NF4 weights with double quantisation, on CUDA only.

bitsandbytes 0.50 loads 4-bit weights on CPU too, but an eval-mode no-grad forward (a reference
pass, evaluation, IFT's first pass) repacks them and later gradients are silently wrong, so 4-bit
on CPU is refused.
"""

from __future__ import annotations

from typing import Any

import align


def quantized_load_kwargs(options: Any, device: Any) -> dict[str, Any]:
    if not options.load_in_4bit:
        return {}
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        raise align.ConfigError(
            "--load-in-4bit (QLoRA) needs a CUDA GPU: on CPU, bitsandbytes repacks 4-bit "
            "weights during no-grad eval-mode forwards (reference passes, evaluation) and later "
            "gradients come out silently wrong. Train LoRA without --load-in-4bit on CPU."
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise align.ConfigError(
            "--load-in-4bit needs bitsandbytes: pip install 'align-plugin-lora[qlora]'"
        ) from None
    dtype = getattr(torch, options.compute_dtype)
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ),
        "dtype": dtype,
        "device_map": {"": device.index or 0},
    }
