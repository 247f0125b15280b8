"""``align compare``: a grid of objectives × options × seeds, each an ordinary run, evaluated on
held-out sets and tabled."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from align.console import echo
from align.errors import AlignError, ConfigError
from align.options import SAMPLING_KEYS

from .options import (
    RUN_FLAGS,
    RunCommand,
    _alias_option,
    load_registry,
    option_for,
    split_section_flags,
)

# align run's flags that align compare takes as lists, or not at all (each with its reason).
GRID_FLAGS = ("objective", "lr", "seed", "output_dir", "resume")
NOT_TAKEN = ("overwrite", "num_processes", "push_to_hub", "hub_private")


def compare_options(func: Any) -> Any:
    from align.aliases import ALIASES

    for name in reversed(RUN_FLAGS):
        if name not in GRID_FLAGS and name not in NOT_TAKEN:
            func = option_for(name)(func)
    for name in reversed(ALIASES):
        if ALIASES[name].key not in (*GRID_FLAGS, *NOT_TAKEN):
            func = _alias_option(name)(func)
    return func


@click.command(cls=RunCommand)
@click.option(
    "--objective",
    "objectives",
    default="sft",
    show_default=True,
    metavar="A,B,…",
    help="Objectives to compare, comma-separated (sft,minorsft,ift).",
)
@click.option(
    "--lr", "lrs", metavar="X,Y,…", help="Learning rates, comma-separated: an axis of the grid."
)
@click.option(
    "--seeds",
    type=click.IntRange(1),
    default=None,
    help="Runs of every grid point with seeds --seed, --seed+1, … [default: 1]",
)
@click.option(
    "--seed",
    "seed_list",
    metavar="S[,S2,…]",
    help="The first seed, or the seeds. [default: the --config file's seed, else 42]",
)
@click.option(
    "--eval",
    "evals",
    multiple=True,
    metavar="NAME=PATH",
    help="A held-out set (prompt/completion or messages records), repeatable: the task being "
    "learned first (the plot's x axis), then those the model should keep.",
)
@click.option(
    "--eval-reward",
    "eval_rewards",
    multiple=True,
    metavar="NAME",
    help="A reward (align rewards) that scores each model's greedy answers on every set whose "
    "records have its columns (addition reads answer). Repeatable.",
)
@click.option(
    "--eval-max-tokens",
    type=click.IntRange(1),
    default=None,
    help="The longest greedy answer scored by --eval-reward, in tokens [default: 256; 16 on "
    "the demo model]",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    help="The comparison's directory [default: runs/compare-<time>]",
)
@click.option("--resume", is_flag=True, help="Continue the comparison in --output-dir.")
@compare_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="As for align run.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=V1[,V2,…]",
    help="An option for every run (KEY=VALUE), or an axis of the grid (KEY=V1,V2): an "
    "objective's option (beta) varies the objectives that have it, SECTION.KEY a plugin "
    "section's, and a core option (max_steps) every run. Repeatable.",
)
def compare(
    objectives: str,
    lrs: str | None,
    seeds: int | None,
    seed_list: str | None,
    evals: tuple[str, ...],
    eval_rewards: tuple[str, ...],
    eval_max_tokens: int | None,
    output_dir: str | None,
    resume: bool,
    config_file: str | None,
    sets: tuple[str, ...],
    **flags: Any,
) -> None:
    """Compare objectives and options on the same model and data: which one learns the new
    task, and which forgets least of what the model knew.

    \b
    align compare --objective sft,minorsft,ift --lr 1e-4,3e-4,1e-3 --set beta=0.1,0.01 \\
        --seeds 2 --model ./task-a-model --data task_b.jsonl --max-steps 150 \\
        --eval task_b=task_b_eval.jsonl --eval task_a=task_a_eval.jsonl --eval-reward addition

    Every point of the grid (objectives × --lr × each --set axis × seeds) is an ordinary run
    of align run's options, in DIR/runs/<run>/, trained one after another in this process.
    Each trained model, and the starting model, is then evaluated on every --eval set: the
    mean NLL of its answer tokens, and with --eval-reward the mean reward of its greedy answers
    (DIR/evals/<run>/<set>.jsonl holds them). DIR/results.md and results.json hold the table,
    DIR/kept-vs-learned.png the first set against each other one, one curve per objective
    through its learning rates. --resume continues a comparison: finished runs are kept,
    interrupted ones resume from their checkpoints; once the comparison is started, the same
    command with --resume in other terminals shares the runs out. Takes align run's options
    but --num-processes, --overwrite and --push-to-hub.
    """
    from align.comparison.api import PERFORMANCE_ONLY, default_output_dir, execute

    try:
        registry = load_registry()
        section_flags = split_section_flags(flags)
        names = _list(objectives, "--objective")
        for name in names:
            registry.objective(name)
        axes: dict[str, list[Any]] = {}
        if lrs is not None:
            axes["lr"] = [_number(v, "--lr") for v in _list(lrs, "--lr")]
        for item in sets:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE or KEY=V1,V2")
            if key in axes:
                raise ConfigError(f"--set {item}: {key} is given twice")
            if flags.get(key) not in (None, (), []):  # the axis would win without a word
                flag = "--" + key.replace("_", "-")
                raise ConfigError(f"--set {key}: {flag} is given too: give one")
            axes[key] = [_scalar(v, item) for v in _list(text, f"--set {key}")]
        first = 42
        if seed_list is None and config_file:  # the config's seed, as align run takes it
            from align.config import load_yaml

            configured = load_yaml(config_file).get("seed")
            if configured is not None:
                first = _integer(str(configured), f"{config_file}: seed")
        if seed_list is not None:
            given = [_integer(v, "--seed") for v in _list(seed_list, "--seed")]
            if len(given) > 1 and seeds is not None:
                raise ConfigError("--seeds N with several --seed values: give one")
            first = given[0]
        seed_values = (
            given
            if seed_list is not None and len(given) > 1
            else list(range(first, first + (seeds or 1)))
        )
        from align.comparison.api import choose_eval_rewards, eval_sets
        from align.comparison.grid import Grid, axis_kind, objective_name
        from align.config import resolve

        grid = Grid(names, axes, seed_values)
        kinds = {key: axis_kind(registry, key, names) for key in axes}
        fixed_flags = {k: v for k, v in flags.items() if v is not None}

        def on_policy(name: str) -> bool:
            return registry.objectives[objective_name(registry, name)].item.on_policy

        any_on_policy = any(on_policy(name) for name in names)

        def make_spec(cell: Any, run_dir: Path, resume_from: str | None, overwrite: bool) -> Any:
            # --reward, --temperature, …: for the on-policy runs of a grid that has some (with
            # none, the run refuses them by name)
            sampling = () if on_policy(cell.objective) or not any_on_policy else SAMPLING_KEYS
            cell_flags = {k: v for k, v in fixed_flags.items() if k not in sampling}
            cell_flags.update(objective=cell.objective, seed=cell.seed)
            cell_flags["output_dir"] = str(run_dir)
            cell_sets = []
            for key, value in cell.values:
                if kinds[key] == "core":
                    cell_flags[key] = value
                elif kinds[key] == "section" and "." not in key:  # lora=true: its switch
                    cell_sets.append(f"{key}.{_switch(registry, key, value)}={json.dumps(value)}")
                else:
                    cell_sets.append(f"{key}={json.dumps(value)}")
            if resume_from:
                cell_flags["resume"] = resume_from
            if overwrite:
                cell_flags["overwrite"] = True
            return resolve(registry, config_file, cell_flags, cell_sets, section_flags)

        if resume and not output_dir:
            raise ConfigError("--resume continues the comparison in --output-dir DIR: give it")
        out = Path(output_dir) if output_dir else default_output_dir()
        shared = {k: v for k, v in fixed_flags.items() if k not in PERFORMANCE_ONLY}
        shared["config"] = config_file
        result = execute(
            out,
            grid,
            eval_sets(list(evals), "--eval"),
            choose_eval_rewards(registry, list(eval_rewards), "--eval-reward"),
            shared,
            make_spec,
            registry,
            resume,
            echo,
            eval_max_tokens,
        )
    except AlignError as exc:
        if getattr(exc, "exit_code", 1) > 128:
            echo(str(exc))
        else:
            echo(f"Error: {exc}")
        sys.exit(getattr(exc, "exit_code", 1))
    click.echo(result.markdown)
    where = f"{result.output_dir}/results.md, results.json"
    if result.plot is not None:
        where += f", {result.plot.name}"
    echo(f"Tables: {where}")
    if not result.complete:
        echo(
            "Some runs are not in the table yet (failed, or training in another process): "
            "`align compare … --resume` with the same options completes it."
        )
        sys.exit(1)


def _list(text: str, flag: str) -> list[str]:
    from align.comparison.grid import split_values

    try:
        return split_values(text)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not a number") from None


def _switch(registry: Any, name: str, value: Any) -> str:
    """The option a section's on/off axis (``--set lora=true,false``) sets: ``enabled``."""
    switch = registry.sections[name].item.flags.get(name)
    if switch is None or not isinstance(value, bool):
        raise ConfigError(
            f"--set {name}={value}: a section takes true/false for its switch, where it has one; "
            f"set its options as {name}.KEY=V1,V2"
        )
    return switch


def _integer(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not an integer") from None


def _scalar(text: str, item: str) -> Any:
    """A value as run.yaml reads it: a YAML scalar (0.1, true, a word)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: {text!r} is not a YAML scalar") from None
    if isinstance(value, dict | list):
        raise ConfigError(f"--set {item!r}: {text!r} is not a single value")
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-2 as a string: the table, plot and JSON need 0.01
    return value


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
