"""What the first-party generation backends share: left-padded prompts, a KV cache filled once
per distinct prompt (the ``num_generations`` copies of a prompt have the same keys and values),
and ``kv_loop``, a lean decoding loop that draws what ``model.generate`` draws.

``kv_loop`` runs one forward per new token on a KV cache it keeps itself, with the attention
mask and position ids computed once, and picks each token as ``model.generate``'s sampling
does: the logits in float32 through transformers' own logits processors (repetition penalty,
then temperature, top-k, top-p and min-p, in ``generate``'s order), then ``torch.multinomial``
on their softmax, one draw per row and step, or the argmax when decoding greedily. So it
consumes torch's random stream as ``generate`` does and, at the same seed, samples the same
tokens; what it leaves out is ``generate``'s per-step bookkeeping (a new set of model inputs,
keyword arguments and stopping criteria per token), which on a small model is a good share
of the time. Only the request's settings apply, not the model's ``generation_config``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..plugins.api import GenerationRequest


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts left-padded to the longest, and their attention mask."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over the attended tokens, 0 on padding (as ``model.generate`` does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def empty_cache(model: Any, repeatable: bool = False) -> Any:
    """A new ``DynamicCache`` for the model's layers; with ``repeatable``, None unless every
    layer holds only attention keys and values (a recurrent state, such as a linear-attention
    layer's, is not copied by ``batch_repeat_interleave``)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if repeatable and any(getattr(cache, "is_linear", [])):
        return None
    return cache


def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any) -> Any:
    """The model run over left-padded tokens into ``cache``; returns the last position's
    logits, or None when the model did not fill ``cache`` (a forward without ``cache=``)."""
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    if cache.get_seq_length() != input_ids.shape[1]:
        return None
    return output.logits[:, -1]


def prompt_cache(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int
) -> Any:
    """The KV cache of each prompt but its last token, computed once per prompt and repeated
    ``repeats`` times along the batch (rows as ``repeat_interleave`` lays them out), for
    ``model.generate`` to continue from; None where it would save nothing or cannot be built
    (one generation per prompt, prompts of one token, a cache that cannot be repeated)."""
    if repeats < 2 or input_ids.shape[1] < 2:
        return None
    cache = empty_cache(model, repeatable=True)
    if cache is None or prefill(model, input_ids[:, :-1], attention_mask[:, :-1], cache) is None:
        return None
    cache.batch_repeat_interleave(repeats)
    return cache


def logits_processors(request: GenerationRequest, attention_mask: torch.Tensor) -> Any:
    """transformers' processors for the request's settings, built as ``model.generate`` builds
    them (the repetition penalty leaves the left padding out); warpers only when sampling."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if request.repetition_penalty != 1.0:
        padding = (attention_mask != 0).int().argmax(dim=1)
        processors.append(
            RepetitionPenaltyLogitsProcessor(
                float(request.repetition_penalty), prompt_ignore_length=padding
            )
        )
    if request.temperature > 0:
        if request.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(request.temperature)))
        if request.top_k:
            processors.append(TopKLogitsWarper(top_k=request.top_k))
        if request.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=float(request.top_p)))
        if request.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=float(request.min_p)))
    return processors


def kv_loop(request: GenerationRequest) -> torch.Tensor:
    """The sampled tokens, ``num_generations`` rows per prompt (prompt by prompt), padded after
    a row's first EOS; as many columns as the longest row needed (at most ``max_new_tokens``).

    The prompts are prefilled once each (their copies share the cache, repeated along the
    batch); each step then picks a token per row from the last logits and runs the model on
    those tokens alone, until every row has drawn an EOS or ``max_new_tokens`` are drawn.
    """
    model, copies = request.model, request.num_generations
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (
        t.to(device) for t in left_padded(request.prompts, request.pad_token_id)
    )
    rows, width = prompt_ids.shape[0] * copies, prompt_ids.shape[1]
    # Every row's tokens and mask for the whole decode, written one column per step.
    tokens = torch.full((rows, width + request.max_new_tokens), request.pad_token_id, device=device)
    tokens[:, :width] = prompt_ids.repeat_interleave(copies, dim=0)
    mask = torch.ones_like(tokens)
    mask[:, :width] = prompt_mask.repeat_interleave(copies, dim=0)
    positions = position_ids(mask)
    processors = logits_processors(request, mask[:, :width])
    eos = torch.tensor(request.eos_token_ids, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    with torch.no_grad():
        cache = empty_cache(model, repeatable=copies > 1)
        logits = None if cache is None else prefill(model, prompt_ids, prompt_mask, cache)
        if logits is not None and copies > 1:  # each prompt once: its cache for every copy
            cache.batch_repeat_interleave(copies)
            logits = logits.repeat_interleave(copies, dim=0)
        if logits is None:  # every row (the model's cache cannot be repeated)
            cache = empty_cache(model)
            if cache is not None:
                logits = prefill(model, tokens[:, :width], mask[:, :width], cache)
            if logits is None:
                raise RuntimeError("kv-loop needs a transformers model whose forward takes cache=")
        for length in range(width, width + request.max_new_tokens):
            scores = processors(tokens[:, :length], logits.float())
            if request.temperature > 0:
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                chosen = scores.argmax(dim=-1)
            chosen = torch.where(unfinished, chosen, request.pad_token_id)
            tokens[:, length] = chosen
            unfinished &= ~torch.isin(chosen, eos)
            if length + 1 == tokens.shape[1] or not unfinished.any():
                break
            logits = model(
                input_ids=chosen[:, None],
                attention_mask=mask[:, : length + 1],
                position_ids=positions[:, length : length + 1],
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
    return tokens[:, width : length + 1]
