"""The ``align`` command line. Listing commands never import torch."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import typing
from typing import Any

import click

from align.config import TrainConfig, check_inputs, resolve
from align.console import echo, tolerant_console
from align.errors import AlignError
from align.options import SAMPLING_KEYS
from align.plugins import FIRST_PARTY_FLAGS, PLUGINS_ENV, get_registry, install_hint
from align.plugins.api import Preset, option_keys

# Core options that get a flag of their own; every other core option is set in the YAML file.
RUN_FLAGS = [
    "objective",
    "model",
    "data",
    "eval_data",
    "data_split",
    "eval_data_split",
    "data_subset",
    "data_revision",
    "data_columns",
    "format",
    "data_workers",
    "data_cache",
    "streaming",
    "shuffle_buffer",
    "output_dir",
    "max_steps",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "max_length",
    "truncation",
    "precision",
    "gradient_checkpointing",
    "disable_dropout",
    "group_by_length",
    "padding_free",
    "save_every",
    "keep_last",
    "resume",
    "eval_every",
    "log_every",
    "trust_remote_code",
    "reference",
    "ref_model",
    "eval_deviation",
    "eval_on_start",
    *SAMPLING_KEYS,  # on-policy objectives: --reward, --temperature, …
    "overwrite",
    "on_nonfinite",
    "num_processes",
]


def _registry() -> Any:
    """The plugin registry, with a warning on stderr (from the first process of a node) naming
    each plugin that failed to load (import, core version, registration, hooks) and why: every
    command says it, not only ``align plugins``."""
    registry = get_registry()
    failed = [
        p for p in registry.plugins.values() if p.errors and not registry.pm.is_registered(p.obj)
    ]
    if failed and os.environ.get("LOCAL_RANK", "0") == "0":
        for info in failed:
            more = f" (and {len(info.errors) - 1} more)" if len(info.errors) > 1 else ""
            click.echo(
                f"Warning: plugin {info.label} ({info.module}) is not loaded: {info.errors[0]}"
                f"{more}",
                err=True,
            )
        click.echo("Warning: `align plugins` lists every plugin and its errors.", err=True)
    return registry


def _option_for(name: str) -> Any:
    field = TrainConfig.model_fields[name]
    flag = "--" + name.replace("_", "-")
    annotation = field.annotation
    args = [t for t in typing.get_args(annotation) if t is not type(None)]
    base = args[0] if args and typing.get_origin(annotation) is not typing.Literal else annotation
    default = f" [default: {field.default}]" if field.default is not None else ""
    help_text = (field.description or "") + default
    if name == "rewards":  # --reward NAME[=WEIGHT], repeatable
        return click.option(
            "--reward",
            name,
            multiple=True,
            metavar="NAME[=WEIGHT]",
            callback=lambda _ctx, _param, value: list(value) or None,
            help=field.description,
        )
    if name in ("data", "eval_data"):  # repeatable: several sources make a mixture
        return click.option(
            flag,
            name,
            multiple=True,
            metavar="PATH[:SHARE]",
            callback=lambda _ctx, _param, value: (
                (list(value) if len(value) > 1 else value[0]) if value else None
            ),
            help=field.description,
        )
    if name == "resume":  # --resume alone means the latest checkpoint
        return click.option(
            flag,
            name,
            is_flag=False,
            flag_value="latest",
            default=None,
            metavar="[PATH]",
            help=help_text,
        )
    if base is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    if typing.get_origin(annotation) is typing.Literal:
        return click.option(
            flag, name, type=click.Choice(typing.get_args(annotation)), default=None, help=help_text
        )
    return click.option(
        flag, name, type={int: int, float: float}.get(base, str), default=None, help=help_text
    )


def _run_options(func: Any) -> Any:
    for name in reversed(RUN_FLAGS):
        func = _option_for(name)(func)
    return func


SECTION_FLAG = "section__"  # prefix of the parameter names of plugin sections' flags


class RunCommand(click.Command):
    """``align run``, with the flags installed plugins' sections declare (``--lora``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["align.args"] = list(args)  # what --num-processes passes on to each process
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            dist = FIRST_PARTY_FLAGS.get(exc.option_name)
            if dist:
                exc.message += f" ({exc.option_name} is added by {dist}: {install_hint(dist)})"
            raise

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = [*self.params, *self._section_params()]
        help_option = self.get_help_option(ctx)
        return [*params, help_option] if help_option is not None else params

    @staticmethod
    def _section_params() -> list[click.Option]:
        params = []
        for name, registered in sorted(get_registry().sections.items()):
            section = registered.item
            keys = option_keys(section.options)
            for flag, key in section.flags.items():
                field = section.options.model_fields[keys[key]]
                dest = f"{SECTION_FLAG}{name}__{key}"
                text = f"{field.description or ''} (sets {name}.{key}; {registered.plugin.label})"
                if field.annotation is bool:
                    params.append(click.Option([f"--{flag}", dest], is_flag=True, help=text))
                else:
                    params.append(click.Option([f"--{flag}", dest], metavar="VALUE", help=text))
        return params


def _split_section_flags(flags: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Take the section flags out of ``flags``: ``{section: {key: value}}`` of those given."""
    sections: dict[str, dict[str, Any]] = {}
    for dest in [d for d in flags if d.startswith(SECTION_FLAG)]:
        value = flags.pop(dest)
        if value is not None and value is not False:
            name, key = dest[len(SECTION_FLAG) :].split("__", 1)
            sections.setdefault(name, {})[key] = value
    return sections


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="align-core", prog_name="align")
def cli() -> None:
    """align: fine-tune language models with objectives installed as plugins.

    \b
    align run                          train SFT on the embedded demo (under a minute on CPU)
    align run --objective minorsft     MinorSFT on the demo; also lora-sft, ift, dpo, kto, orpo
    align run --objective grpo         GRPO on the demo's sums, rewarded by --reward addition
    align run --objective sft --model DIR --data FILE.jsonl [--lora]
    align merge ADAPTER --output DIR   fold a LoRA adapter into its base model
    align inspect --objective dpo      the first examples, token by token, with loss masks
    align prepare --model M --data F   tokenise the data into the cache ahead of a run
    align plot RUN_DIR                 loss and metric curves of a run as a PNG
    align verify RUN_DIR               check a run's checkpoints and final/ byte for byte
    align new-plugin NAME              start a plugin project (--kind objective|reward|format)
    align objectives                   objectives installed, with their options
    align formats                      data formats: shape, columns, objectives each feeds
    align rewards                      reward functions (--reward) and generators
    align plugins                      plugins installed, their versions, hooks and errors
    """


@cli.command(cls=RunCommand)
@_run_options
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML file: core options at top level, objective options in a section named "
    "after the objective, plugin options in their own section. Flags win.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Objective option (KEY=VALUE) or plugin section option (SECTION.KEY=VALUE); "
    "values are read as YAML scalars. Repeatable.",
)
def run(config_file: str | None, sets: tuple[str, ...], **flags: Any) -> None:
    """Train a model with an objective.

    With neither --model nor --data, trains the built-in tiny model on the objective's demo
    data, with demo defaults (lr 3e-3, batch 16, 4 epochs, cosine) for options you do not
    set. --batch-size is per process; --max-steps wins over --epochs. Output goes to
    --output-dir (default runs/<objective>-<time>/): metrics.jsonl, run.json, final/ and
    checkpoints/step-N/ (every --save-every N steps, and on SIGINT/SIGTERM, which then stop
    the run). --resume continues an interrupted run from its newest intact checkpoint (each
    checkpoint's files are checked against its manifest), exactly as if it had not stopped; one
    run at a time writes a directory, and align writes only into a new or empty one or its
    own run's; --num-processes N trains data-parallel on N processes. Flags that
    plugins add (such as --lora) set options of their sections.
    """
    from align.loop.launch import launch, needs_launch

    try:
        registry = _registry()
        section_flags = _split_section_flags(flags)
        spec = resolve(registry, config_file, flags, list(sets), section_flags)
        check_inputs(spec)  # before torch: a wrong flag or path costs a second, not a load
        if needs_launch(spec.config.num_processes):
            args = click.get_current_context().meta["align.args"]
            with tolerant_console():
                sys.exit(launch(spec.config.num_processes, args))
        from align.loop.setup import removed_if_unstarted
        from align.loop.train import train

        with tolerant_console(), removed_if_unstarted():
            train(spec, registry)
        if "WORLD_SIZE" in os.environ:
            _exit_worker()
    except AlignError as exc:
        _exit_with(exc)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # torchrun's workers: one line, not one each
            echo(
                "Interrupted outside the training steps (before the first or after the final "
                "save); nothing more to save."
            )
        sys.exit(130)


def _exit_worker() -> None:
    """A launcher's worker whose run completed (everything written, flushed and the process
    group torn down) exits at once: the interpreter's teardown of the distributed libraries'
    native threads aborted it now and then under load ("terminate called without an active
    exception" after the run completed, exit -6; 1 run in 6-8 of a resumed ZeRO-3 run)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to keep
            stream.flush()
    os._exit(0)


def _exit_with(exc: AlignError) -> None:
    """Print the error (from the first process only, when there are several) and exit."""
    if os.environ.get("RANK", "0") == "0":
        stopped_by_signal = getattr(exc, "exit_code", 1) > 128
        echo(str(exc) if stopped_by_signal else f"Error: {exc}")  # even into a closed pipe
    sys.exit(getattr(exc, "exit_code", 1))


@cli.command()
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def objectives(as_json: bool) -> None:
    """List installed objectives with their options, defaults and help.

    An objective that several plugins register is listed with the clash (``align run``
    refuses it), and the command then exits with status 1, as ``align plugins`` does.
    """
    registry = _registry()
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
        if item["on_policy"]:
            click.echo("  on-policy: samples completions and learns from --reward functions")
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def formats(as_json: bool) -> None:
    """List the registered data formats: the shape of the records each gives, the columns it
    reads (and those that identify it when --format is not given), and the objectives it feeds
    (every objective that trains on its shape)."""
    from align.data.shapes import SHAPES

    registry = _registry()

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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rewards(as_json: bool) -> None:
    """List reward functions (for --reward) and generation backends (for --generator)."""
    registry = _registry()
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
        for opt in item["options"]:
            click.echo(_option_line(f"reward.{item['name']}.{opt['name']}", opt))
    click.echo("generators (--generator):")
    for item in generators:
        click.echo(f"  {item['name']}  ({item['provided_by']}): {item['description']}")


@cli.command()
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Directory.")
@click.option("--base", help="Base model (default: the adapter's base_model_name_or_path).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--trust-remote-code", is_flag=True, help="Run model code from the hub (unsafe).")
def merge(
    adapter: str, output: str, base: str | None, overwrite: bool, trust_remote_code: bool
) -> None:
    """Merge a LoRA adapter (a run's final/ or checkpoint) into its base model.

    Writes a full model (safetensors) and the tokenizer to --output, loadable with
    AutoModelForCausalLM.from_pretrained.
    """
    try:
        from align.tools.merge import merge_adapter

        merge_adapter(adapter, output, base, overwrite, trust_remote_code)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Merged model: {output}")


@cli.command(cls=RunCommand)
@_run_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="As for align run.")
@click.option(
    "-n", "count", default=3, show_default=True, type=click.IntRange(1), help="Examples to show."
)
def inspect(config_file: str | None, sets: tuple[str, ...], count: int, **flags: Any) -> None:
    """Show the first examples as the model will see them: each token, its id, whether the loss
    trains on it, and special tokens. Takes align run's options (--objective, --model, --data,
    --max-length, --truncation, ...); with neither --model nor --data, the demo's."""
    try:
        registry = _registry()
        section_flags = _split_section_flags(flags)
        spec = resolve(registry, config_file, flags, list(sets), section_flags)
        check_inputs(spec)
        from align.tools.inspect_data import inspect_examples

        inspect_examples(spec, registry, count, click.echo)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command(cls=RunCommand)
@_run_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="As for align run.")
def prepare(config_file: str | None, sets: tuple[str, ...], **flags: Any) -> None:
    """Tokenise the data into the cache ahead of a run, and print the data report. Takes align
    run's options (--objective, --model, --data, --eval-data, --max-length, --truncation,
    --data-workers, ...): a later align run with the same data options, model and ALIGN_CACHE
    maps the tokenised data instead of tokenising it, on every process."""
    try:
        registry = _registry()
        section_flags = _split_section_flags(flags)
        spec = resolve(registry, config_file, flags, list(sets), section_flags)
        check_inputs(spec)
        from align.tools.prepare_data import prepare_data

        prepare_data(spec, registry, click.echo)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="PNG (default: in RUN_DIR).")
def plot(run_dir: str, output: str | None) -> None:
    """Plot a run's loss and metric curves from metrics.jsonl to a PNG (needs matplotlib)."""
    from align.tools.plot import plot_run

    try:
        target = plot_run(run_dir, output)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Wrote {target}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def verify(run_dir: str) -> None:
    """Check every checkpoint and final/ of a run against its manifest (each file's size and
    sha256, written when the directory was complete). Loads nothing, changes nothing.

    Exits with status 1 when any is damaged.
    """
    from align.tools.verify import verify_run

    try:
        intact = verify_run(run_dir, click.echo)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None
    if not intact:
        sys.exit(1)


@cli.command("new-plugin")
@click.argument("name")
@click.option("--dir", "directory", default=".", type=click.Path(file_okay=False), help="Parent.")
@click.option(
    "--kind",
    type=click.Choice(["objective", "reward", "format"]),
    default="objective",
    show_default=True,
    help="What the plugin registers: objective (an objective and a starting loss, tested by "
    "align.testing.ObjectiveConformance), reward (a reward function for on-policy objectives, "
    "tested by RewardConformance) or format (a data format, tested by FormatConformance).",
)
def new_plugin(name: str, directory: str, kind: str) -> None:
    """Write a ready-to-install plugin project, align-plugin-NAME/: an objective (the default),
    a reward (--kind reward) or a data format (--kind format).

    It holds a pyproject with the entry point and the core version bound, a module that
    registers the objective (with a starting loss), the reward or the format, a README and a
    test that runs the align.testing conformance suite of its kind.
    """
    from align.plugins.scaffold import new_plugin as scaffold

    try:
        root = scaffold(name, directory, kind=kind)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Wrote {root}. Next: pip install -e '{root}[test]' && python -m pytest {root}")


def main() -> None:
    cli()
