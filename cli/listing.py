"""The listing commands: ``align plugins``, ``objectives``, ``formats`` and ``rewards``. They
never import torch."""

from __future__ import annotations

import json
import sys
import typing
from typing import Any

import click

from align.plugins import PLUGINS_ENV, get_registry, install_hint
from align.plugins.api import Preset
from align.rollout.model_reward import MODEL_PREFIX, ModelRewardOptions

from .options import load_registry


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List installed plugins: distribution, version, objectives, data formats, hooks, status.

    Exits with status 1 when any plugin has an error.
    """
    registry = get_registry()
    infos = list(registry.plugins.values())
    if as_json:
        click.echo(json.dumps([info.as_dict() for info in infos], indent=2))
    elif not infos:
        click.echo(f"No plugins loaded (check {PLUGINS_ENV} and `pip list | grep align-plugin`).")
    for info in [] if as_json else infos:
        click.echo(f"{info.label} {info.version or ''}  [{info.status}]")
        click.echo(f"  module: {info.module}")
        if info.objectives:
            click.echo(f"  objectives: {', '.join(info.objectives)}")
        if info.sections:
            click.echo(f"  sections: {', '.join(info.sections)}")
        if info.formats:
            click.echo(f"  data formats: {', '.join(info.formats)}")
        if info.rewards:
            click.echo(f"  rewards: {', '.join(info.rewards)}")
        if info.generators:
            click.echo(f"  generators: {', '.join(info.generators)}")
        if info.hooks:
            click.echo(f"  hooks: {', '.join(info.hooks)}")
        for error in info.errors:
            click.echo(f"  error: {error}")
    if any(info.errors for info in infos):
        sys.exit(1)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _option_line(key: str, opt: dict[str, Any]) -> str:
    return f"  --set {key}=<{opt['type']}>  (default {opt['default']!r})  {opt['help']}"


def _describe_options(schema: Any) -> list[dict[str, Any]]:
    rows = []
    for name, field in schema.model_fields.items():
        rows.append(
            {
                "name": field.alias or name,
                "default": "(required)"
                if field.is_required()
                else field.get_default(call_default_factory=True),
                "type": _type_name(field.annotation),
                "help": field.description or "",
            }
        )
    return rows


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def objectives(as_json: bool) -> None:
    """List installed objectives with their options, defaults and help.

    An objective that several plugins register is listed with the clash (``align run``
    refuses it), and the command then exits with status 1, as ``align plugins`` does.
    """
    registry = load_registry()
    data, presets = [], []
    clashes = [{**c, "status": "clash", "distribution": None} for c in registry.objective_clashes()]
    for name, reg in sorted(registry.objectives.items()):
        obj = reg.item
        if isinstance(obj, Preset):
            presets.append(
                {
                    "name": name,
                    "description": obj.description,
                    "preset_of": obj.objective,
                    "options": obj.options,
                    "sections": obj.sections,
                    "distribution": reg.plugin.label,
                    "status": "ok",
                }
            )
            continue
        data.append(
            {
                "name": name,
                "description": obj.description,
                "shapes": list(obj.shapes),
                "formats": list(registry.formats_of(obj)),
                "fields": _describe_options(obj.fields) if obj.fields is not None else [],
                "needs_reference": (
                    "depends on options" if callable(obj.needs_reference) else obj.needs_reference
                ),
                "on_policy": obj.on_policy,
                "model_class": obj.model_class,
                "learns_from_rewards": obj.on_policy and _learns_from_rewards(obj),
                "needs_teacher": obj.needs_teacher,
                "distribution": reg.plugin.label,
                "status": "ok",
                "options": _describe_options(obj.options),
            }
        )
    if as_json:
        click.echo(json.dumps(data + presets + clashes, indent=2, default=str))
        if clashes:
            sys.exit(1)
        return
    if not data and not clashes:
        click.echo(f"No objectives installed. Try: {install_hint('align-plugin-sft')}")
    for item in data:
        click.echo(f"{item['name']}  ({item['distribution']})")
        click.echo(f"  {item['description']}")
        click.echo(f"  data: {' or '.join(item['shapes'])} — formats: {', '.join(item['formats'])}")
        if item["fields"]:
            click.echo(f"  record fields: {', '.join(f['name'] for f in item['fields'])}")
        if item["needs_reference"] is True:
            click.echo("  uses reference log-probs")
        elif item["needs_reference"]:
            click.echo("  uses reference log-probs with some options")
        if item["needs_teacher"]:
            click.echo("  distils from a teacher model (--teacher)")
        if item["learns_from_rewards"]:
            click.echo("  on-policy: samples completions and learns from --reward functions")
        elif item["on_policy"]:
            click.echo("  on-policy: samples completions (--reward optional: scored and logged)")
        if item["model_class"] == "sequence_classification":
            click.echo("  trains a reward model: AutoModelForSequenceClassification, one score")
        for opt in item["options"]:
            click.echo(_option_line(opt["name"], opt))
    for item in presets:
        settings = [f"{k}={v}" for k, v in item["options"].items()]
        for section, values in item["sections"].items():
            settings += [f"{section}.{k}={v}" for k, v in values.items()]
        click.echo(f"{item['name']}  ({item['distribution']})")
        click.echo(f"  {item['description']}")
        click.echo(f"  preset: {item['preset_of']} with {', '.join(settings) or 'its defaults'}")
    for item in clashes:
        owners = [r["distribution"] for r in item["registered_by"]]
        click.echo(f"{item['name']}  (clash: {' and '.join(dict.fromkeys(owners))})")
        click.echo(f"  error: `align run --objective {item['name']}` refuses it: {item['error']}")
        for registration in item["registered_by"]:
            click.echo(f"  {registration['distribution']}: {registration['description']}")
    for name, reg in sorted(registry.sections.items()):
        click.echo(f"section {name}  ({reg.plugin.label}): {reg.item.description}")
        flags = {key: flag for flag, key in reg.item.flags.items()}
        for opt in _describe_options(reg.item.options):
            line = _option_line(f"{name}.{opt['name']}", opt)
            if opt["name"] in flags:
                line += f" Flag: --{flags[opt['name']]}."
            click.echo(line)
    if clashes:
        sys.exit(1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def formats(as_json: bool) -> None:
    """List the registered data formats: the shape of the records each gives, the columns it
    reads (and those that identify it when --format is not given), and the objectives it feeds
    (every objective that trains on its shape)."""
    from align.data.shapes import SHAPES

    registry = load_registry()

    def feeds(shape: str) -> list[str]:
        names = []
        for name, reg in sorted(registry.objectives.items()):
            item = reg.item
            if isinstance(item, Preset):
                target = registry.objectives.get(item.objective)
                item = target.item if target is not None else None
            if item is not None and not isinstance(item, Preset) and shape in item.shapes:
                names.append(name)
        return names

    data = [
        {
            "name": name,
            "description": reg.item.description,
            "shape": reg.item.shape,
            "shape_description": SHAPES[reg.item.shape].description
            if reg.item.shape in SHAPES
            else "the plugin's own shape",
            "columns": list(reg.item.columns),
            "detected_by": [list(need) for need in reg.item.detect],
            "provided_by": reg.plugin.label,
            "objectives": feeds(reg.item.shape),
        }
        for name, reg in sorted(registry.formats.items())
    ]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for item in data:
        click.echo(f"{item['name']}  ({item['provided_by']})")
        click.echo(f"  {item['description']}")
        click.echo(f"  shape: {item['shape']} — {item['shape_description']}")
        click.echo(f"  columns: {', '.join(item['columns'])}")
        detect = " | ".join("+".join(need) for need in item["detected_by"]) or "never (--format)"
        click.echo(f"  detected by: {detect}")
        click.echo(f"  feeds: {', '.join(item['objectives']) or 'no installed objective'}")


def _model_reward() -> dict[str, Any]:
    """``--reward model:PATH``: not a registration; one reward per reward model given, its
    options set under its name (``reward.NAME.KEY``)."""
    return {
        "name": MODEL_PREFIX + "PATH",
        "description": "a sequence-classification reward model's score of each prompt and "
        "completion, read with its own tokenizer and chat template; named after PATH's "
        "directory (RUN for an align run's RUN/final)",
        "provided_by": "align-core",
        "fields": [],
        "options": _describe_options(ModelRewardOptions),
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rewards(as_json: bool) -> None:
    """List reward functions (for --reward) and generation backends (for --generator)."""
    registry = load_registry()
    data = [
        {
            "name": name,
            "description": reg.item.description,
            "provided_by": reg.plugin.label,
            "fields": _describe_options(reg.item.fields) if reg.item.fields is not None else [],
            "options": _describe_options(reg.item.options),
        }
        for name, reg in sorted(registry.rewards.items())
    ]
    data.append(_model_reward())
    generators = [
        {"name": name, "description": reg.item.description, "provided_by": reg.plugin.label}
        for name, reg in sorted(registry.generators.items())
    ]
    if as_json:
        click.echo(json.dumps({"rewards": data, "generators": generators}, indent=2))
        return
    for item in data:
        click.echo(f"{item['name']}  ({item['provided_by']})")
        click.echo(f"  {item['description']}")
        if item["fields"]:
            click.echo(f"  record fields: {', '.join(f['name'] for f in item['fields'])}")
        name = "NAME" if item["name"] == MODEL_PREFIX + "PATH" else item["name"]
        for opt in item["options"]:
            click.echo(_option_line(f"reward.{name}.{opt['name']}", opt))
    click.echo("generators (--generator):")
    for item in generators:
        click.echo(f"  {item['name']}  ({item['provided_by']}): {item['description']}")


def _learns_from_rewards(objective: Any) -> bool:
    """Whether an on-policy objective, with its default options, learns from rewards."""
    try:
        return bool(objective.sampling(objective.options()).rewards)
    except Exception:  # noqa: BLE001 - options without defaults: the common case, rewards
        return True
