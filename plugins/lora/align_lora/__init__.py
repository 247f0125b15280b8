"""LoRA for every objective: the ``lora`` section, ``--lora``/``--adapter``/``--load-in-4bit``,
and the ``lora-sft`` preset (shared/objectives.md §1).

A model-preparation plugin: when ``lora.enabled`` is on, ``align_prepare_model`` wraps the policy
in a PEFT LoRA adapter (``align_lora.adapter``); the core then trains only the adapter, saves
adapter-only checkpoints and, for objectives with a reference, uses the policy with its adapter
switched off as the reference.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

import align


class LoraOptions(align.Options):
    enabled: bool = Field(False, description="Train a LoRA adapter instead of every weight.")
    r: int = Field(16, ge=1, description="Rank of the adapter matrices.")
    alpha: float = Field(32.0, gt=0, description="Scale: the update is (alpha/r)·BA.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' (every linear projection but the output "
        "layer) or a list of module names such as [q_proj, v_proj].",
    )
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/√r instead of alpha/r.")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full next to the adapter (e.g. [lm_head, embed_tokens]).",
    )
    adapter: str | None = Field(
        None,
        description="Start from this saved adapter (a run's final/ or checkpoint); it is also "
        "the reference of objectives that use one.",
    )
    load_in_4bit: bool = Field(
        False, description="QLoRA: load the base in 4-bit NF4 with double quantisation (CUDA)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="QLoRA compute dtype."
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            return [value]
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or use all-linear")
        return value


def active(options: LoraOptions) -> bool:
    """An adapter trains: --lora, or --adapter or --load-in-4bit (each implies it)."""
    return options.enabled or bool(options.adapter) or options.load_in_4bit


def load_kwargs(options: LoraOptions, device) -> dict:
    from .quantization import quantized_load_kwargs

    return quantized_load_kwargs(options, device)


@align.hookimpl
def align_register_sections(register):
    register(
        align.Section(
            name="lora",
            description="LoRA adapters for any objective (PEFT); QLoRA with load_in_4bit.",
            options=LoraOptions,
            flags={"lora": "enabled", "adapter": "adapter", "load-in-4bit": "load_in_4bit"},
            load_kwargs=load_kwargs,
            label="LoRA",
            active=active,
        )
    )


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Preset(
            name="lora-sft",
            description="SFT with a LoRA adapter: r=16, alpha=32, dropout=0.05, all linear "
            "projections.",
            objective="sft",
            sections={"lora": {"enabled": True}},
        )
    )


@align.hookimpl
def align_prepare_model(model, config, sections):
    options = sections.get("lora")
    if options is None or not active(options):
        return None
    from .adapter import add_adapter

    return add_adapter(model, options, config)
