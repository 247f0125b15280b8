"""One score per sequence from a sequence classifier (a reward model), in either batch layout.

A padded batch (``input_ids``, ``attention_mask``) goes through the model's own forward: its
``logits`` ``[B, 1]`` are the score at each row's last token that is not the pad token (the
model finds it through ``config.pad_token_id``), exactly what
``AutoModelForSequenceClassification`` gives at inference and what TRL's ``RewardTrainer``
trains.

A packed batch (``align.packing``) holds several sequences per row and a shared prompt once, so
the model's own pooling (the last non-pad token of a row) means nothing there. The forward
runs with the packed positions and attention, the classifier head's per-position output is
caught as it leaves the head (``[R, T, 1]``: one number per position, no copy of the hidden
states), and each sequence takes the value at its own last non-pad token: the last position of
its branch (the part after the shared prompt, which starts with a copy of the prompt's last
token) whose input is not the pad token. That is the position the model's own pooling picks
for the sequence alone in a padded row, so the scores are the padded ones
(:func:`align.model.probe.why_not_packable` checks it for every model before a run packs).
"""

from __future__ import annotations

from typing import Any

import torch

from .attention import packed_attention
from .head import inner_model


def classifier_head(model: Any) -> torch.nn.Module | None:
    """The module that maps hidden states to scores: ``score`` (transformers' decoder
    classifiers, wrapped by PEFT's ``modules_to_save`` under LoRA), the outermost one."""
    found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "score"]
    if not found:
        return None
    return min(found, key=lambda item: item[0].count("."))[1]


def sequence_scores(model: Any, batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
    """The model's score of every sequence of ``batch`` (keys optionally prefixed), float32,
    differentiable, in the order the batch lists its sequences."""
    if f"{prefix}targets" not in batch:
        output = model(
            input_ids=batch[f"{prefix}input_ids"],
            attention_mask=batch[f"{prefix}attention_mask"],
            use_cache=False,
        )
        return output.logits.squeeze(-1).float()
    head = classifier_head(model)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no classifier head named 'score': its scores of a "
            "packed batch cannot be read"
        )
    caught: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _args, out: caught.append(out))
    try:
        inputs = {"input_ids": batch[f"{prefix}input_ids"], "use_cache": False}
        model(**inputs, **packed_attention(batch, prefix, model))
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(
            f"{type(model).__name__}'s forward called its classifier head {len(caught)} times, "
            "not once: its scores of a packed batch cannot be read"
        )
    per_position = caught[0].squeeze(-1).float().flatten()
    pad_token_id = inner_model(model).config.pad_token_id  # DDP's wrapper has no config
    return per_position[last_positions(batch, pad_token_id, prefix)]


def last_positions(batch: dict[str, Any], pad_token_id: int | None, prefix: str = "") -> Any:
    """Per sequence of a packed batch, the flat index of the position scored: its branch's last
    position whose token is not ``pad_token_id`` (its branch's last position when every one is:
    a sequence that is all pad tokens)."""
    ids = batch[f"{prefix}input_ids"].flatten()
    block = batch[f"{prefix}attention_block"].flatten()
    prompt_block = batch[f"{prefix}attention_prompt_block"].flatten()
    sequence = batch[f"{prefix}target_sequence"].flatten()
    real = batch[f"{prefix}token_mask"].flatten().bool()
    total = int(batch[f"{prefix}sequence_digests"].shape[0])
    is_prompt = torch.isin(block, prompt_block[prompt_block >= 0])  # a shared prompt's position
    branch = real & ~is_prompt
    index = torch.arange(ids.numel(), device=ids.device)
    none = torch.full((total,), -1, dtype=torch.long, device=ids.device)
    last = none.scatter_reduce(0, sequence[branch], index[branch], "amax")
    scored = branch if pad_token_id is None else branch & (ids != pad_token_id)
    last_real = none.scatter_reduce(0, sequence[scored], index[scored], "amax")
    if bool((last < 0).any()):
        raise ValueError("a packed batch lists a sequence that has no position")
    return torch.where(last_real >= 0, last_real, last)
