"""``align run``, ``align inspect`` and ``align prepare``: the commands that take run options."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import click

from align.config import check_inputs, resolve
from align.console import echo, tolerant_console
from align.errors import AlignError

from .options import RunCommand, load_registry, run_options, split_section_flags


@click.command(cls=RunCommand)
@run_options
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
    data, with demo defaults (lr 3e-3, batch 16, 4 epochs, max length 64, cosine) for options
    you do not set; the run's first lines name those it takes. --batch-size is per process;
    --max-steps wins over --epochs. Output goes to --output-dir (default
    runs/<objective>-<time>/, runs/dpo-lora-<time>/ for --objective dpo --lora): metrics.jsonl,
    run.json, train.log (what the run printed, and the internal details --verbose prints),
    final/ and checkpoints/step-N/ (by default every 10 minutes of training, the newest two
    kept; every --save-every N steps instead, all kept unless --keep-last; none with
    --save-every 0; and on SIGINT/SIGTERM, which then stop the run). --resume continues an
    interrupted run from its newest intact checkpoint (each checkpoint's files are checked
    against its manifest), exactly as if it had not stopped; one run at a time writes a
    directory, and align writes only into a new or empty one or its own run's; --num-processes
    N trains data-parallel on N processes. Flags that plugins add (such as --lora) set options
    of their sections. TRL's and transformers' names (--learning-rate,
    --per-device-train-batch-size, --bf16, ...) are accepted too: the list ends this help.
    """
    from align.loop.launch import launch, needs_launch

    try:
        registry = load_registry()
        section_flags = split_section_flags(flags)
        spec = resolve(registry, config_file, flags, list(sets), section_flags)
        check_inputs(spec)  # before torch: a wrong flag or path costs a second, not a load
        if needs_launch(spec.config.num_processes):
            args = click.get_current_context().meta["align.args"]
            with tolerant_console():
                sys.exit(launch(spec.config.num_processes, args))
        from align.api import run as run_spec  # align.train's way to the same run

        with tolerant_console():
            run_spec(spec, registry)
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


@click.command(cls=RunCommand)
@run_options
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
        registry = load_registry()
        section_flags = split_section_flags(flags)
        spec = resolve(registry, config_file, flags, list(sets), section_flags)
        check_inputs(spec)
        from align.tools.inspect_data import inspect_examples

        inspect_examples(spec, registry, count, click.echo)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None


@click.command(cls=RunCommand)
@run_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="As for align run.")
def prepare(config_file: str | None, sets: tuple[str, ...], **flags: Any) -> None:
    """Tokenise the data into the cache ahead of a run, and print the data report. Takes align
    run's options (--objective, --model, --data, --eval-data, --max-length, --truncation,
    --data-workers, ...): a later align run with the same data options, model and ALIGN_CACHE
    maps the tokenised data instead of tokenising it, on every process."""
    try:
        registry = load_registry()
        section_flags = split_section_flags(flags)
        spec = resolve(registry, config_file, flags, list(sets), section_flags)
        check_inputs(spec)
        from align.tools.prepare_data import prepare_data

        prepare_data(spec, registry, click.echo)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None
