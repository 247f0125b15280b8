"""Setting up the ``--reference`` mode a run asked for, and recording what it cost."""

from __future__ import annotations

import gc
import hashlib
import itertools
import sys
import time
from typing import Any

import torch

from ..config import RunSpec
from ..console import detail
from ..errors import ConfigError
from ..model.probe import why_not_packable
from .models import (
    AdapterReference,
    ModelReference,
    Reference,
    has_adapter,
    load_reference_model,
)
from .precompute import DigestTable, PrecomputedReference, model_identity, precompute_split


def reference_mode(cfg: Any, policy: Any, on_policy: bool = False) -> str:
    """``--reference`` as given; by default ``adapter`` for a policy with a PEFT adapter (no
    second model, no pass), else ``precomputed``, or ``model`` for an on-policy objective (its
    completions are new every step: no pass before training can score them)."""
    if "reference" in cfg.model_fields_set:
        return cfg.reference
    if cfg.ref_model:
        return "model" if on_policy else cfg.reference
    if has_adapter(policy):
        return "adapter"
    return "model" if on_policy else cfg.reference


def copy_starting_model(spec: RunSpec, model: Any) -> ModelReference | None:
    """``--reference model`` without ``--ref-model``: copy the model before any plugin wraps it."""
    cfg = spec.config
    uses_reference = spec.objective.item.uses_reference(spec.options) or cfg.eval_deviation
    if uses_reference and cfg.reference == "model" and not cfg.ref_model:
        return ModelReference.frozen_copy(model)
    return None


def make_reference(
    spec: RunSpec,
    policy: Any,
    tokenizer: Any,
    examples: dict[str, list[dict[str, Any]]],
    accelerator: Any,
    starting_copy: ModelReference | None,
    packed: bool = False,
) -> tuple[Reference, dict[str, Any]]:
    """The run's reference, before ``accelerator.prepare``; and a record of its mode and cost.

    ``precomputed`` scores with ``--ref-model``, loaded only on a cache miss and freed
    afterwards, or else with the prepared policy itself in eval mode: before the first update it
    computes the starting model's function (as long as the preparing plugins leave that
    unchanged, as LoRA's zero-initialised adapter does), so no second model is loaded.
    ``packed``: the policy takes padding-free batches (``align.packing``), so the pass scores
    them too, prompts shared, unless its ``--ref-model`` cannot (probed once loaded: then the
    pass pads, which changes no value it looks up). Whether the run's batches suit a reference
    that scores them is :func:`why_reference_cannot_pack`'s question.
    """
    cfg = spec.config
    started = time.time() - (starting_copy.setup_seconds if starting_copy else 0.0)
    mode = reference_mode(cfg, policy, spec.objective.item.on_policy)
    info: dict[str, Any] = {"mode": mode, "ref_model": cfg.ref_model or cfg.model}
    if mode == "adapter":
        reference: Reference = AdapterReference(accelerator.unwrap_model(policy))
        info["starting_adapter"] = reference.has_reference_adapter
    elif mode == "model":
        if starting_copy is not None:
            reference = starting_copy
        elif cfg.ref_model:
            reference = ModelReference(
                load_reference_model(cfg.ref_model, tokenizer, cfg.trust_remote_code)
            )
        else:  # an on-policy objective's default: the prepared policy (no adapter) copied
            reference = ModelReference.frozen_copy(policy)
        reference.model.to(accelerator.device)
    else:
        loaded: list[Any] = []

        def scorer() -> tuple[Any, bool]:  # loaded on the first cache miss only
            if not loaded:
                model, packs = policy, packed
                if cfg.ref_model:
                    model = load_reference_model(cfg.ref_model, tokenizer, cfg.trust_remote_code)
                model.to(accelerator.device)
                if cfg.ref_model and packed:  # the policy was probed by the caller
                    reason = why_not_packable(model, "reference model", accelerator)
                    packs = reason is None
                    if reason and accelerator.is_main_process:
                        print(
                            f"padding_free: off for the reference pass, {reason}; "
                            "it scores padded batches.",
                            file=sys.stderr,
                            flush=True,
                        )
                loaded.append((model, packs))
            return loaded[0]

        identity = _scorer_identity(spec, policy)
        tables = []
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
            tables.append(part)
            info["splits"][split] = {
                "sequences": report.sequences,
                "cache": report.cache,
                "cache_hit": report.cache_hit,
                "seconds": round(report.seconds, 2),
            }
            if not report.cache_hit:
                info["splits"][split]["packed"] = report.packed
            if accelerator.is_main_process:
                detail(f"reference {report.summary()}")
        if cfg.ref_model and loaded:
            loaded.clear()  # the only reference to the --ref-model: free it before training
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        reference = PrecomputedReference(DigestTable.merged(tables))
    reference.autocast = accelerator.autocast  # the policy's mixed precision
    info["setup_seconds"] = round(time.time() - started, 2)
    return reference, info


def why_reference_cannot_pack(reference: Reference, accelerator: Any) -> str | None:
    """Why the run's batches must be padded for its reference, or None.

    A separate model (``--reference model``: ``--ref-model`` or the starting model's copy)
    scores every batch, so it is probed like the policy. ``adapter`` mode runs the policy itself,
    already probed, and a precomputed reference looks its values up whatever the layout.
    """
    if isinstance(reference, ModelReference):
        return why_not_packable(reference.model, "reference model", accelerator)
    return None


def _scorer_identity(spec: RunSpec, policy: Any) -> dict[str, Any]:
    """Everything besides the sequences that decides the precomputed values (the cache key)."""
    import transformers

    cfg = spec.config
    try:
        if spec.given.model is not None and not cfg.ref_model:  # align.train(model=object)
            model = {"in_memory": weights_digest(policy)}
        else:
            model = model_identity(cfg.ref_model or cfg.model)
    except (OSError, TypeError, ValueError) as exc:
        what = "reference model" if cfg.ref_model else "model"
        raise ConfigError(f"cannot load {what} {cfg.ref_model or cfg.model!r}: {exc}") from None
    identity = {
        "model": model,
        "precision": cfg.precision,
        "attention": getattr(policy.config, "_attn_implementation", None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if not cfg.ref_model:  # the policy scores itself, after the preparing plugins
        identity["prepared"] = prepared_model_fingerprint(policy)
    return identity


def weights_digest(model: Any) -> str:
    """A sha256 of every parameter's and buffer's name, shape, dtype and bytes: a model handed
    over in memory has no files to identify it by, and may differ from any it was loaded from."""
    digest = hashlib.sha256()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if not tensor.is_meta and tensor.numel():
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
            digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def prepared_model_fingerprint(model: Any) -> str:
    """What model-preparation plugins may have changed in the policy, cheaply: each module's
    type and forward hooks, each parameter's and buffer's name, shape and dtype, and samples of
    its values. Whether a parameter trains (``requires_grad``) does not change what it scores,
    so it is left out."""
    digest = hashlib.blake2b(digest_size=16)
    for name, module in model.named_modules():
        hooks = (len(module._forward_hooks), len(module._forward_pre_hooks))
        digest.update(f"{name}:{type(module).__name__}:{hooks}".encode())
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if not tensor.is_meta and tensor.numel():
            flat = tensor.detach().reshape(-1)
            sample = torch.cat([flat[:8], flat[-8:]]).double().cpu()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
