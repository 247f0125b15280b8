"""What ``align run``, ``align inspect`` and ``align prepare`` share: the core options' flags,
the flags plugin sections add, and the plugin registry with its load warnings."""

from __future__ import annotations

import os
import textwrap
import typing
from typing import Any

import click

from align.aliases import ALIASES, help_rows, suggestion
from align.config import TrainConfig
from align.options import SAMPLING_KEYS
from align.plugins import FIRST_PARTY_FLAGS, get_registry, install_hint
from align.plugins.api import option_keys

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
    "save_minutes",
    "keep_last",
    "resume",
    "eval_every",
    "log_every",
    "report_to",
    "push_to_hub",
    "hub_private",
    "trust_remote_code",
    "reference",
    "ref_model",
    "teacher",
    "teacher_device",
    "teacher_precision",
    "eval_deviation",
    "eval_on_start",
    *SAMPLING_KEYS,  # on-policy objectives: --reward, --temperature, …
    "overwrite",
    "on_nonfinite",
    "num_processes",
    "verbose",
]


def load_registry() -> Any:
    """The plugin registry, with a warning on stderr (from the first process of a node) naming
    each plugin that failed to load (import, core version, registration, hooks) and why: every
    command says it, not only ``align plugins``."""
    registry = get_registry()
    failed = registry.not_loaded()
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


def option_for(name: str) -> Any:
    """``align run``'s click option for the core option ``name`` (its flag, type, help and
    default), as a decorator."""
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
    if typing.get_origin(base) is typing.Literal:  # an optional choice too (Literal | None)
        return click.option(
            flag, name, type=click.Choice(typing.get_args(base)), default=None, help=help_text
        )
    return click.option(
        flag, name, type={int: int, float: float}.get(base, str), default=None, help=help_text
    )


def _alias_option(name: str) -> Any:
    """A TRL/transformers name's flag (``--learning-rate``): hidden from the option list (the
    help's section of them lists it); its value reaches ``resolve`` under the TRL name, which
    converts it."""
    alias = ALIASES[name]
    field = TrainConfig.model_fields[alias.key]
    if name == "resume_from_checkpoint":  # alone: the latest checkpoint, as --resume
        return click.option(
            alias.flag, name, is_flag=False, flag_value="latest", default=None, hidden=True
        )
    if field.annotation is bool or alias.key == "precision":  # --bf16: set, or not given
        callback = lambda _ctx, _param, value: value or None  # noqa: E731
        return click.option(alias.flag, name, is_flag=True, callback=callback, hidden=True)
    kinds = [t for t in typing.get_args(field.annotation) if t is not type(None)]
    bare = kinds[0] if len(kinds) == 1 else field.annotation  # int | None: int
    base = {int: int, float: float}.get(bare, str)
    if alias.convert is not None and base is int:  # 2.0 accepted, 2.5 refused by name
        base = float
    return click.option(alias.flag, name, type=base, default=None, hidden=True)


def run_options(func: Any) -> Any:
    for name in reversed(RUN_FLAGS):
        func = option_for(name)(func)
    for name in reversed(ALIASES):  # TRL's names, hidden: RunCommand's help lists them
        func = _alias_option(name)(func)
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
            elif exc.option_name.startswith("--"):  # TRL's names first, then click's guess
                flags = [o[2:] for p in self.get_params(ctx) for o in p.opts if o[:2] == "--"]
                name = exc.option_name[2:].replace("-", "_")
                found = suggestion(name, [f.replace("-", "_") for f in flags], flags=True)
                if found:
                    exc.message = f"No such option: {exc.option_name}.{found}"
                    exc.possibilities = None
            raise

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The TRL/transformers names accepted, after the options: one section, from the table
        in ``align.aliases``."""
        super().format_epilog(ctx, formatter)
        rows = help_rows(set(RUN_FLAGS))
        with formatter.section("TRL/transformers names (also as run.yaml keys, with underscores)"):
            formatter.write_dl(rows[:-2])
            for term, text in rows[-2:]:  # lists of flags: wrapped between flags, not at dashes
                lines = textwrap.wrap(
                    text,
                    width=max(formatter.width - formatter.current_indent - 4, 40),
                    break_on_hyphens=False,
                )
                formatter.write_text(f"{term}:")
                formatter.indent()
                for line in lines:
                    formatter.write(f"{'':>{formatter.current_indent}}{line}\n")
                formatter.dedent()

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


def split_section_flags(flags: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Take the section flags out of ``flags``: ``{section: {key: value}}`` of those given."""
    sections: dict[str, dict[str, Any]] = {}
    for dest in [d for d in flags if d.startswith(SECTION_FLAG)]:
        value = flags.pop(dest)
        if value is not None and value is not False:
            name, key = dest[len(SECTION_FLAG) :].split("__", 1)
            sections.setdefault(name, {})[key] = value
    return sections
