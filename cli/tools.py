"""The commands that work on a finished run or model: ``align merge``, ``plot``, ``verify``, and
``align new-plugin``."""

from __future__ import annotations

import sys

import click

from align.errors import AlignError


@click.command()
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
    AutoModelForCausalLM.from_pretrained; a reward model's adapter (task type SEQ_CLS)
    gives a reward model, loadable with AutoModelForSequenceClassification.from_pretrained
    and usable as --reward model:OUTPUT.
    """
    try:
        from align.tools.merge import merge_adapter

        merge_adapter(adapter, output, base, overwrite, trust_remote_code)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Merged model: {output}")


@click.command()
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


@click.command()
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


@click.command("new-plugin")
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
