"""Setting up the ``--reference`` mode a run asked for, and recording what it cost."""

from __future__ import annotations

import gc
import sys
import time
from typing import Any

import torch

from .config import RunSpec
from .plugins import PluginRegistry
from .precompute import PrecomputedReference, model_identity, precompute_split
from .reference import AdapterReference, ModelReference, Reference, load_reference_model


def copy_starting_model(spec: RunSpec, model: Any) -> ModelReference | None:
    """``--reference model`` without ``--ref-model``: copy the model before any plugin wraps it."""
    cfg = spec.config
    if spec.objective.item.needs_reference and cfg.reference == "model" and not cfg.ref_model:
        return ModelReference.frozen_copy(model)
    return None


def make_reference(
    spec: RunSpec,
    registry: PluginRegistry,
    policy: Any,
    tokenizer: Any,
    examples: dict[str, list[dict[str, Any]]],
    accelerator: Any,
    starting_copy: ModelReference | None,
) -> tuple[Reference, dict[str, Any]]:
    """The run's reference, before ``accelerator.prepare``; and a record of its mode and cost.

    ``precomputed`` scores with ``--ref-model``, freed afterwards, or else with the prepared
    policy itself in eval mode: before the first update it *is* the starting model, so no second
    model is ever loaded.
    """
    cfg = spec.config
    started = time.time() - (starting_copy.setup_seconds if starting_copy else 0.0)
    info: dict[str, Any] = {"mode": cfg.reference, "ref_model": cfg.ref_model or cfg.model}
    if cfg.reference == "adapter":
        reference: Reference = AdapterReference(accelerator.unwrap_model(policy))
    elif cfg.reference == "model":
        reference = starting_copy or ModelReference(
            load_reference_model(cfg.ref_model, tokenizer, cfg.trust_remote_code)
        )
        reference.model.to(accelerator.device)
    else:
        if cfg.ref_model:
            scorer = load_reference_model(cfg.ref_model, tokenizer, cfg.trust_remote_code)
            identity = {"model": model_identity(cfg.ref_model)}
        else:
            scorer = policy
            identity = {
                "model": model_identity(cfg.model),
                "prepared_by": _model_preparation(registry, spec),
            }
        scorer.to(accelerator.device)
        table: dict[bytes, float] = {}
        info["splits"] = {}
        for split, split_examples in examples.items():
            part, report = precompute_split(
                scorer,
                identity,
                split_examples,
                split,
                2 * cfg.batch_size,
                tokenizer.pad_token_id,
                accelerator,
            )
            table.update(part)
            info["splits"][split] = {
                "sequences": report.sequences,
                "cache": report.cache,
                "cache_hit": report.cache_hit,
                "seconds": round(report.seconds, 2),
            }
            if accelerator.is_main_process:
                print(f"reference {report.summary()}", file=sys.stderr, flush=True)
        if scorer is not policy:
            del scorer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        reference = PrecomputedReference(table)
    info["setup_seconds"] = round(time.time() - started, 2)
    return reference, info


def _model_preparation(registry: PluginRegistry, spec: RunSpec) -> dict[str, Any]:
    """What may have changed the policy before the pass: preparing plugins and their sections."""
    preparing = []
    for impl in registry.pm.hook.align_prepare_model.get_hookimpls():
        info = registry.plugins.get(impl.plugin_name)
        preparing.append(f"{info.label}=={info.version}" if info else impl.plugin_name)
    return {
        "plugins": sorted(preparing),
        "sections": {name: options.model_dump() for name, options in spec.sections.items()},
    }
