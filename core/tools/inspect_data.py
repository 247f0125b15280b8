"""``align inspect``: tokenised examples as the model will see them, token by token.

Each sequence of an example is listed with its token ids, the decoded token, and whether the
loss trains on it, with special tokens marked: the check users want when a chat template or a
loss mask goes wrong.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import RunSpec
from ..data.batching import sequence_prefixes
from ..plugins.hooks import ObjectiveHooks
from ..plugins.registry import PluginRegistry


def inspect_examples(
    spec: RunSpec, registry: PluginRegistry, count: int, echo: Callable[[str], None]
) -> None:
    from ..loop.data import build_examples, data_sources
    from ..loop.setup import apply_demo_defaults, load_tokenizer

    apply_demo_defaults(spec, registry)
    cfg = spec.config
    tokenizer = load_tokenizer(cfg)
    hooks = ObjectiveHooks(registry, spec, tokenizer)
    sources = data_sources(cfg)["train"]
    examples, report, _ = build_examples(hooks, cfg, sources, "train")
    label = " + ".join(source.label for source in sources)
    echo(f"{label}: {report.summary()}; max_length {cfg.max_length}, {cfg.truncation}")
    echo(
        f"objective {spec.objective.item.name}, data format {report.format}, tokenizer {cfg.model}"
    )
    special = set(tokenizer.all_special_ids)
    for number, example in enumerate(examples[:count], start=1):
        extra = {k: v for k, v in example.items() if not k.endswith(("input_ids", "_mask"))}
        echo(f"\n=== example {number} {extra if extra else ''}".rstrip())
        for prefix in sequence_prefixes(example):
            ids = example[f"{prefix}input_ids"]
            # A prompt to sample from (on-policy objectives) has nothing trained of its own.
            mask = example.get(f"{prefix}completion_mask", [0] * len(ids))
            label = prefix.rstrip("_") or "sequence"
            echo(f"--- {label} ({len(ids)} tokens, {sum(mask)} trained)")
            for i, (token_id, trained) in enumerate(zip(ids, mask, strict=True)):
                piece = tokenizer.convert_ids_to_tokens(token_id)
                text = f"{tokenizer.decode([token_id])!r} {piece!r}"
                mark = "TRAIN" if trained else "     "
                tag = "  <special>" if token_id in special else ""
                echo(f"{i:>5} {token_id:>7} {mark} {text}{tag}")
            trained_text = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
            echo(f"    trained text: {trained_text!r}")
