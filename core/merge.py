"""``align merge``: a LoRA adapter folded into its base model, saved as a full model."""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import replace_dir
from .errors import ConfigError
from .loading import load_causal_lm


def merge_adapter(
    adapter: str,
    output: str,
    base: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Load ``base`` (default: the adapter's ``base_model_name_or_path``) with the adapter,
    merge, and write the model (safetensors) and tokenizer to ``output`` atomically."""
    try:
        from peft import PeftConfig, PeftModel
    except ImportError:
        raise ConfigError("align merge needs peft: pip install align-plugin-lora") from None
    from transformers import AutoTokenizer

    target = Path(output)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target} exists and is not empty; pass --overwrite to replace it")
    try:
        config = PeftConfig.from_pretrained(adapter)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{adapter} is not a PEFT adapter directory: {exc}") from None
    base = base or config.base_model_name_or_path
    if not base:
        raise ConfigError(f"{adapter}: the adapter names no base model; pass --base")
    model = load_causal_lm(base, trust_remote_code, role="base model")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer_source = adapter if (Path(adapter) / "tokenizer_config.json").exists() else base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, target)
    return target
