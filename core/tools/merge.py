"""``align merge``: a LoRA adapter folded into its base model, saved as a full model."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..loop.checkpoint import replace_dir
from ..loop.resume import refused
from ..model.loading import (
    is_sequence_classifier,
    load_pretrained,
    saved_sequence_classifier,
    set_pad_token_id,
)


def _stored_dtype(base: str, trust_remote_code: bool) -> torch.dtype | None:
    """The dtype the base model's config declares (bf16 stays bf16), or None."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def merge_adapter(
    adapter: str,
    output: str,
    base: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Load ``base`` (default: the adapter's ``base_model_name_or_path``) with the adapter,
    merge in float32, and write the model (safetensors, in the base's stored dtype) and the
    tokenizer to ``output`` atomically. ``output`` may not be the adapter's or base's folder."""
    from transformers import AutoTokenizer

    target = Path(output).resolve()
    for source in (Path(adapter).resolve(), Path(base).resolve() if base else None):
        if source is not None and (target == source or target in source.parents):
            raise ConfigError(f"--output {output} would overwrite its own input {source}")
    if target == Path.cwd() or target.parent == target:
        raise ConfigError(f"--output {output}: give a directory of its own")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target} exists and is not empty; pass --overwrite to replace it")
    model, base = load_with_adapter(adapter, base, trust_remote_code)
    stored = _stored_dtype(base, trust_remote_code)
    merged = model.merge_and_unload()
    if stored is not None:  # merged in float32, saved in the base's own precision
        merged = merged.to(stored)
    tokenizer_source = adapter if (Path(adapter) / "tokenizer_config.json").exists() else base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    if is_sequence_classifier(merged) and tokenizer.pad_token_id is not None:
        # A reward model finds each text's last token by its pad token: the tokenizer's, which
        # it trained with (align and TRL set it on the model's config; an adapter saves no
        # config, and the base's own pad_token_id may be another or none).
        set_pad_token_id(merged, tokenizer.pad_token_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, target)
    return target


def adapter_base(adapter: str | Path, base: str | None = None) -> str:
    """``base`` if given, else the base model an adapter directory names (its
    ``base_model_name_or_path``); the directory is checked to be a PEFT adapter either way."""
    try:
        from peft import PeftConfig
    except ImportError:
        raise ConfigError("LoRA adapters need peft: pip install peft") from None
    try:
        config = PeftConfig.from_pretrained(str(adapter))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{adapter} is not a PEFT adapter directory: {exc}") from None
    if not (base or config.base_model_name_or_path):
        raise ConfigError(
            f"{adapter}: the adapter names no base model (base_model_name_or_path in "
            "adapter_config.json); align merge takes it as --base"
        )
    return base or config.base_model_name_or_path


def load_with_adapter(
    adapter: str | Path,
    base: str | None = None,
    trust_remote_code: bool = False,
    **extra: Any,
) -> tuple[Any, str]:
    """The base model (default: the adapter's ``base_model_name_or_path``) with the adapter
    loaded onto it (a ``PeftModel``, not merged), and the base's name. ``extra`` goes to the
    base's ``from_pretrained`` (``dtype``, …). Pickled adapter weights that hold code are
    refused; an adapter whose shapes do not fit the base is named with it."""
    base = adapter_base(adapter, base)
    from peft import PeftModel

    # A reward model's adapter (PEFT's SEQ_CLS, its score head saved with it) goes onto the
    # base loaded as a one-label sequence classifier, which its head then replaces.
    kind = "sequence_classification" if saved_sequence_classifier(adapter) else "causal_lm"
    model = load_pretrained(base, trust_remote_code, kind, role="base model", **extra)
    try:
        return PeftModel.from_pretrained(model, str(adapter)), base
    except pickle.UnpicklingError:
        raise refused(adapter_weights(adapter)) from None
    except RuntimeError as exc:  # shapes that do not match the base model
        raise ConfigError(
            f"adapter {adapter} does not fit base model {base!r}: {str(exc).splitlines()[0]}"
        ) from None


def adapter_weights(adapter: str | Path) -> Path:
    """The file PEFT loads an adapter's weights from: safetensors, else the pickled ``.bin``
    (loaded with ``weights_only``; one that holds code is refused)."""
    safe = Path(adapter) / "adapter_model.safetensors"
    return safe if safe.exists() else Path(adapter) / "adapter_model.bin"
