"""``final/README.md``: the hub's model card, with its YAML metadata, as TRL writes one.

The metadata (``huggingface_hub.ModelCardData``): ``base_model`` (the starting model's hub id;
left out for a local directory or the demo, which are no hub ids, as TRL does),
``library_name`` (``transformers`` for a full model, ``peft`` for an adapter: what the hub loads
it with), ``tags`` (``align``, the objective, ``lora`` for an adapter), ``datasets`` (the hub
datasets trained or evaluated on), ``model_name`` (the run directory's name) and
``pipeline_tag`` (``text-classification`` for a reward model). The body: how to load it, the
objective, the final metrics, the versions of align, its plugins and the libraries, and the
resolved config as YAML.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from ..console import RUN_LOGGER
from ..data.sources import is_hub_id
from .metrics import format_value

ADAPTER_FILE = "adapter_config.json"


def base_model_id(model: str | None) -> str | None:
    """The starting model's hub id; None for a local directory, or for the demo (None)."""
    if not model or Path(model).exists():
        return None
    return model


def write_card(directory: Path, **details: Any) -> None:
    """Write ``README.md`` into a model directory (before its manifest is written);
    ``details``: :func:`model_card`'s arguments but ``adapter``, read from the directory."""
    adapter = (directory / ADAPTER_FILE).is_file()
    try:
        card = model_card(adapter=adapter, **details)
    except Exception as exc:  # metadata: it must not fail a trained run, nor hang its peers
        message = " ".join(str(exc).split()) or type(exc).__name__
        logging.getLogger(RUN_LOGGER).warning(f"Warning: no model card in final/: {message}")
        return
    (directory / "README.md").write_text(card, encoding="utf-8")


def model_card(
    *,
    name: str,
    objective: str,
    provided_by: str,
    model: str | None,
    datasets: list[str],
    config: dict[str, Any],
    requirements: list[str],
    versions: dict[str, str],
    metrics: dict[str, dict[str, Any]],
    steps: int,
    load_from: str,
    adapter: bool,
    preset: str | None = None,
    model_class: str = "causal_lm",
) -> str:
    """The card's text. ``metrics``: the last training row (``train``) and evaluation row
    (``eval``) of metrics.jsonl; ``load_from``: the hub repository or directory the quick
    start loads."""
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_id(model)
    hub_datasets = list(dict.fromkeys(d for d in datasets if is_hub_id(d)))
    tags = ["align", objective, *([preset] if preset and preset != objective else [])]
    if adapter:
        tags.append("lora")
    data = ModelCardData(
        base_model=base,
        library_name="peft" if adapter else "transformers",
        model_name=name,
        tags=tags,
        datasets=hub_datasets or None,
        pipeline_tag="text-generation" if model_class == "causal_lm" else "text-classification",
    )
    kind = "a LoRA adapter" if adapter else "a model"
    start = f"`{model}`" if model else "align's demo model"
    if base:
        start = f"[{base}](https://huggingface.co/{base})"
    on = ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in hub_datasets)
    lines = [
        f"# {name}",
        "",
        f"This is {kind} trained from {start}{f' on {on}' if on else ''} with the `{objective}` "
        f"objective of align ({provided_by}), "
        f"{steps} steps.",
        "",
        "## Quick start",
        "",
        "```python",
        *_quick_start(load_from, adapter, model_class),
        "```",
        "",
        "## Training",
        "",
        *_metrics_table(metrics),
        "### Framework versions",
        "",
        *[f"- {name}: {version}" for name, version in _versions(requirements, versions)],
        "",
        "### Training config",
        "",
        "The resolved options of `align run` (`run.json` in the run directory holds them too):",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _quick_start(path: str, adapter: bool, model_class: str) -> list[str]:
    if model_class == "sequence_classification":
        return _reward_model_start(path, adapter)
    return _adapter_start(path) if adapter else _model_start(path)


def _reward_model_start(path: str, adapter: bool) -> list[str]:
    """A reward model: one score per text (higher: preferred)."""
    auto = (
        "AutoPeftModelForSequenceClassification"
        if adapter
        else "AutoModelForSequenceClassification"
    )
    source = "peft" if adapter else "transformers"
    return [
        "import torch",
        f"from {source} import {auto}",
        "from transformers import AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
        *(
            [
                f"model = {auto}.from_pretrained(  # the base model, adapted: a reward model",
                f'    "{path}", num_labels=1, pad_token_id=tokenizer.pad_token_id',
                ")",
            ]
            if adapter
            else [f'model = {auto}.from_pretrained("{path}")  # a reward model']
        ),
        'inputs = tokenizer("Hello, how are you?", return_tensors="pt")',
        "with torch.no_grad():",
        "    print(model(**inputs).logits[0, 0].item())  # the text's reward",
    ]


def _model_start(path: str) -> list[str]:
    return [
        "from transformers import pipeline",
        "",
        f'generator = pipeline("text-generation", model="{path}")',
        'print(generator("Hello,", max_new_tokens=32)[0]["generated_text"])',
    ]


def _adapter_start(path: str) -> list[str]:
    return [
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{path}")  # the base model, adapted',
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
        'inputs = tokenizer("Hello,", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
    ]


def _metrics_table(metrics: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for split, title in (("train", "Training"), ("eval", "Evaluation")):
        row = metrics.get(split)
        if not row:
            continue
        prefix = "eval_" if split == "eval" else ""
        lines += [f"{title} metrics at step {row['step']}:", "", "| metric | value |", "|---|---|"]
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                shown = value if isinstance(value, int) else format_value(value)
                lines.append(f"| {key.removeprefix(prefix)} | {shown} |")
        lines.append("")
    return lines or ["No metrics were logged.", ""]


def _versions(requirements: list[str], versions: dict[str, str]) -> list[tuple[str, str]]:
    found = [tuple(r.split("==", 1)) for r in requirements if "==" in r]
    return [*found, *((name, version) for name, version in versions.items())]  # type: ignore[misc]
