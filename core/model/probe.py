"""Whether a model gives packed batches the log-probs (a sequence classifier: the scores) it
gives padded ones: a probe forward."""

from __future__ import annotations

from typing import Any

from ..data.batching import sequence_batch
from ..data.packing import pack
from .attention import is_flash
from .dropout import eval_mode
from .loading import is_sequence_classifier
from .logprobs import forward_logps
from .scores import sequence_scores


def why_not_packable(
    model: Any, role: str = "model", accelerator: Any = None, shared_prompts: bool = True
) -> str | None:
    """None when ``model`` gives packed batches the log-probs it gives padded ones; else why not,
    naming the model by its ``role`` ("the reference model has …").

    Packing needs attention that applies the packed layout (``align.model.attention``: ``sdpa``
    and ``eager`` take a 4-D mask, ``flex_attention`` a block mask, flash attention sequence
    boundaries, which express plain packing alone: ``shared_prompts=False`` says the batches
    share no prompt), positions from ``position_ids``, and no sliding-window layers (the packed
    mask replaces their window). A no-grad forward of three short sequences, packed and padded,
    checks the rest; it needs the weights, so call it before FSDP shards the model. Weights on
    the meta device cannot be probed, and are a reason. With ``accelerator``, the main process
    probes and every process takes its answer, so all pack or all pad: they hold the same model,
    and the main process holds its weights even where FSDP's ``cpu_ram_efficient_loading``
    leaves the others' on the meta device.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return _why_not_packable(model, role, shared_prompts)
    from accelerate.utils import broadcast_object_list

    answer: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            answer[0] = _why_not_packable(model, role, shared_prompts)
        except Exception as exc:  # raised here alone, it would leave the others waiting
            answer[0] = f"the {role} could not be probed ({type(exc).__name__}: {exc})"
    broadcast_object_list(answer)
    return answer[0]


def _why_not_packable(model: Any, role: str, shared_prompts: bool = True) -> str | None:
    import torch

    config = getattr(model, "config", None)
    reason = _attention_reason(config, role, shared_prompts)
    if reason:
        return reason
    if any(p.is_meta for p in model.parameters()):
        return f"the {role}'s weights are on the meta device, so no probe forward can check it"
    groups = _probe_groups(model.get_input_embeddings().num_embeddings, shared_prompts)
    rows = [{"input_ids": ids, "completion_mask": mask} for group in groups for ids, mask in group]
    parameter = next(model.parameters())
    mixed = _flash_over_float32(model, parameter)
    autocast = torch.autocast(parameter.device.type, dtype=torch.bfloat16, enabled=mixed)
    classifier = is_sequence_classifier(model)  # a reward model: scores, not log-probs

    def scored(batch: dict) -> Any:
        batch = {k: v.to(parameter.device) for k, v in batch.items()}
        if classifier:
            return sequence_scores(model, batch).float()
        return forward_logps(model, batch).sums.float()

    try:
        with torch.no_grad(), eval_mode(model), autocast:
            pad = (model.config.pad_token_id or 0) if classifier else 0  # its pooling's pad
            packed, padded = (scored(b) for b in [pack(groups, pad), sequence_batch(rows, pad)])
    except Exception as exc:  # a model whose forward rejects the packed layout
        return f"the {role} rejects a packed batch ({type(exc).__name__}: {exc})"
    exact = parameter.dtype == torch.float32 and not mixed
    tolerance = 1e-4 if exact else 5e-2
    if not torch.allclose(packed, padded, rtol=0, atol=tolerance):
        what = "scores" if classifier else "log-probs"
        return f"the {role}'s {what} of a packed batch differ from a padded one's"
    return None


def _attention_reason(config: Any, role: str, shared_prompts: bool) -> str | None:
    """Why the configured attention cannot apply the packed layout, or None."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(kind != "full_attention" for kind in layer_types):
            return f"the {role} has sliding-window attention layers"
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"the {role} has sliding-window attention"
    implementation = getattr(config, "_attn_implementation", None)
    if is_flash(implementation):
        if shared_prompts:
            return (
                f"the {role}'s {implementation} attention takes sequence boundaries only, so "
                "sequences cannot share a prompt (flex_attention or sdpa can)"
            )
        return None
    if implementation == "flex_attention":
        if getattr(config, "attention_dropout", 0.0):  # transformers' flex refuses dropout
            return f"the {role} has attention dropout, which flex_attention does not apply"
        return None
    if implementation not in ("sdpa", "eager"):
        return f"the {role}'s {implementation} attention takes no custom 4-D mask"
    return None


def _probe_groups(vocab: int, shared_prompts: bool) -> list[list[tuple[list, list]]]:
    """Three short sequences: two sharing a prompt (each in a group of its own when the
    batches share none) and one alone."""
    prompt = [(3 + 5 * i) % vocab for i in range(6)]
    pair = [(prompt + [7, 9, 11], [0] * 6 + [1] * 3), (prompt + [13, 15], [0] * 6 + [1] * 2)]
    alone = ([(4 + 3 * i) % vocab for i in range(5)], [0, 0, 1, 1, 1])
    if shared_prompts:
        return [pair, [alone]]
    return [[pair[0]], [pair[1]], [alone]]


def _flash_over_float32(model: Any, parameter: Any) -> bool:
    """Whether the probe runs under bf16 autocast: flash attention takes 16-bit inputs only, and
    training runs it under mixed precision over float32 weights."""
    import torch

    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return is_flash(implementation) and parameter.dtype == torch.float32
