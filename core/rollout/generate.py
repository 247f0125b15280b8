"""Sampling completions: the first-party ``transformers`` backend (``model.generate``), and a
round's set-up around any backend (eval mode, no gradients, the run's precision, a seed).

A completion ends at its first EOS (kept, as the model must learn to stop) or after
``max_completion_length`` tokens; one without EOS is *truncated*. TRL's ``GRPOTrainer`` does the
same: it left-pads the prompts for ``model.generate`` and masks everything after the first EOS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..plugins.api import GenerationRequest, Generator


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and every EOS the model's generation config names (chat models end
    a turn with one of their own)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for value in extra if isinstance(extra, list | tuple) else [extra]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    """A sampled continuation up to and including its first EOS (what follows is padding)."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids


def generation_config(request: GenerationRequest) -> Any:
    """The ``GenerationConfig`` of a request's settings (its prompts aside): ``temperature`` 0
    decodes greedily, and the model's own ``generation_config`` sampling values do not apply."""
    from transformers import GenerationConfig

    sample = request.temperature > 0
    settings: dict[str, Any] = {
        "max_new_tokens": request.max_new_tokens,
        "do_sample": sample,
        "pad_token_id": request.pad_token_id,
        "eos_token_id": request.eos_token_ids,
        "repetition_penalty": request.repetition_penalty,
        "use_cache": True,
    }
    if sample:
        settings.update(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
        if request.min_p is not None:
            settings["min_p"] = request.min_p
    else:
        settings.update(temperature=None, top_p=None, top_k=None)
    return GenerationConfig(**settings)


def transformers_generate(request: GenerationRequest) -> list[list[int]]:
    """``model.generate`` on the left-padded prompts, each repeated ``num_generations`` times;
    ``temperature`` 0 decodes greedily. Each prompt but its last token is run once, and
    ``generate`` continues from that cache repeated for the prompt's copies (where the model's
    cache allows): the same samples as without it, less prefill."""
    import torch

    from .sampler import left_padded, prompt_cache

    model = request.model
    device = next(model.parameters()).device
    input_ids, attention_mask = (
        t.to(device) for t in left_padded(request.prompts, request.pad_token_id)
    )
    # A generation config that picks its own kind of cache (static, offloaded) keeps it.
    own_cache = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    with torch.no_grad():
        cache = (
            None
            if own_cache
            else prompt_cache(model, input_ids, attention_mask, request.num_generations)
        )
    # Each prompt repeated once per generation, as TRL does: greedy decoding takes no
    # num_return_sequences, and sampling draws the same way either way.
    output = model.generate(
        input_ids=input_ids.repeat_interleave(request.num_generations, dim=0),
        attention_mask=attention_mask.repeat_interleave(request.num_generations, dim=0),
        generation_config=generation_config(request),
        **({} if cache is None else {"cache": cache}),
    )
    eos = set(request.eos_token_ids)
    width = input_ids.shape[1]
    return [cut_at_eos(row.tolist(), eos) for row in output[:, width:].cpu()]


def kv_loop_generate(request: GenerationRequest) -> list[list[int]]:
    """:func:`.sampler.kv_loop`: ``model.generate``'s samples, from a leaner loop."""
    from .sampler import kv_loop

    eos = set(request.eos_token_ids)
    return [cut_at_eos(row, eos) for row in kv_loop(request).tolist()]


GENERATORS = (
    Generator(
        "transformers",
        "model.generate from transformers, on the training process (CPU or GPU; LoRA too)",
        transformers_generate,
    ),
    Generator(
        "kv-loop",
        "model.generate's sampling in a lean loop on the model's KV cache, on the training "
        "process (same samples at the same seed, faster; CPU or GPU; LoRA too)",
        kv_loop_generate,
    ),
)


def align_register_generators(register: Any) -> None:
    """The core's own registration (the registry calls it as it calls a plugin's hook)."""
    for generator in GENERATORS:
        register(generator)


@contextlib.contextmanager
def sampling_context(model: Any, accelerator: Any, seed: int) -> Iterator[Any]:
    """The unwrapped policy in eval mode, without gradients, under the run's autocast, with
    torch's generator seeded by ``seed`` (restored afterwards, so sampling leaves the
    training RNG as it was)."""
    import torch

    from ..model.dropout import eval_mode

    unwrapped = accelerator.unwrap_model(model)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=devices),
        torch.no_grad(),
        eval_mode(unwrapped),
        accelerator.autocast(),
    ):
        torch.manual_seed(seed)
        yield unwrapped


def round_seed(seed: int, round_index: int, process_index: int, split: str = "train") -> int:
    """The seed of one round of sampling: a function of the run's seed, the round and the
    process only, so a resumed run samples what the uninterrupted one would have."""
    offset = {"train": 0, "eval": 1}[split]
    return (seed * 1_000_003 + round_index * 7_919 + process_index * 104_729 + offset) % (2**63)
