"""Wrapping the policy in a PEFT LoRA adapter, or loading a saved one."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import align
from align.model.loading import is_sequence_classifier
from align.reference import REFERENCE_ADAPTER


def lora_config(options: Any, task_type: str = "CAUSAL_LM") -> Any:
    """PEFT's LoRA config. ``task_type`` ``SEQ_CLS`` (a reward model) makes PEFT train the
    classifier head (``score``) in full alongside the adapter and save it with it."""
    from peft import LoraConfig

    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        use_rslora=options.use_rslora,
        modules_to_save=options.modules_to_save or None,
        task_type=task_type,
    )


def add_adapter(model: Any, options: Any, config: Any) -> Any:
    """A fresh trainable adapter, or ``options.adapter`` loaded trainable and, once more,
    frozen under the name the core's adapter reference switches to."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},  # as the core sets it
        )
    if options.adapter:
        try:
            model = PeftModel.from_pretrained(model, options.adapter, is_trainable=True)
            model.load_adapter(options.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        except pickle.UnpicklingError:  # torch.load(weights_only=True) met code, not tensors
            raise align.ConfigError(
                f"lora.adapter: refused to load {_weights_file(options.adapter)}: it holds code, "
                "not tensors (adapters load tensors only)"
            ) from None
        except (OSError, ValueError) as exc:
            raise align.ConfigError(
                f"lora.adapter: cannot load adapter {options.adapter!r}: {exc}"
            ) from None
        except RuntimeError as exc:  # shapes that do not match the base model
            raise align.ConfigError(
                f"lora.adapter: adapter {options.adapter!r} does not fit model "
                f"{config.model!r}: {str(exc).splitlines()[0]}"
            ) from None
        model.set_adapter("default")
    else:
        task_type = "SEQ_CLS" if is_sequence_classifier(model) else "CAUSAL_LM"
        model = get_peft_model(model, lora_config(options, task_type))
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # reentrant checkpointing needs a grad at the input
    return model


def _weights_file(adapter: str) -> Path:
    safe = Path(adapter) / "adapter_model.safetensors"
    return safe if safe.exists() else Path(adapter) / "adapter_model.bin"
