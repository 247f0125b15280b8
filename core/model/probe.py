"""Whether a model gives packed batches the log-probs it gives padded ones: a probe forward."""

from __future__ import annotations

from typing import Any

from ..data.batching import sequence_batch
from ..data.packing import pack
from .dropout import eval_mode
from .logprobs import forward_logps


def why_not_packable(model: Any, role: str = "model", accelerator: Any = None) -> str | None:
    """None when ``model`` gives packed batches the log-probs it gives padded ones; else why not,
    naming the model by its ``role`` ("the reference model has …").

    Packing needs attention that takes a custom 4-D mask (``sdpa``, ``eager``), positions from
    ``position_ids``, and no sliding-window layers (a custom mask replaces their window). A
    no-grad forward of three short sequences, packed and padded, checks the rest; it needs the
    weights, so call it before FSDP shards the model. Weights on the meta device cannot be
    probed, and are a reason. With ``accelerator``, the main process probes and every process
    takes its answer, so all pack or all pad: they hold the same model, and the main process
    holds its weights even where FSDP's ``cpu_ram_efficient_loading`` leaves the others' on the
    meta device.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return _why_not_packable(model, role)
    from accelerate.utils import broadcast_object_list

    answer: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            answer[0] = _why_not_packable(model, role)
        except Exception as exc:  # raised here alone, it would leave the others waiting
            answer[0] = f"the {role} could not be probed ({type(exc).__name__}: {exc})"
    broadcast_object_list(answer)
    return answer[0]


def _why_not_packable(model: Any, role: str) -> str | None:
    import torch

    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(kind != "full_attention" for kind in layer_types):
            return f"the {role} has sliding-window attention layers"
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"the {role} has sliding-window attention"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"the {role}'s {implementation} attention implementation takes no custom 4-D mask"
    if any(p.is_meta for p in model.parameters()):
        return f"the {role}'s weights are on the meta device, so no probe forward can check it"
    vocab = model.get_input_embeddings().num_embeddings
    prompt = [(3 + 5 * i) % vocab for i in range(6)]
    groups = [
        [(prompt + [7, 9, 11], [0] * 6 + [1] * 3), (prompt + [13, 15], [0] * 6 + [1] * 2)],
        [([(4 + 3 * i) % vocab for i in range(5)], [0, 0, 1, 1, 1])],
    ]
    rows = [{"input_ids": ids, "completion_mask": mask} for group in groups for ids, mask in group]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), eval_mode(model):
            batches = [pack(groups, 0), sequence_batch(rows, 0)]
            packed, padded = (
                forward_logps(model, {k: v.to(device) for k, v in b.items()}).sums.float()
                for b in batches
            )
    except Exception as exc:  # a model whose forward rejects the packed layout
        return f"the {role} rejects a packed batch ({type(exc).__name__}: {exc})"
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not torch.allclose(packed, padded, rtol=0, atol=tolerance):
        return f"the {role}'s log-probs of a packed batch differ from a padded one's"
    return None
