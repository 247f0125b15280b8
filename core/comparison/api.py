"""``align.compare`` and what ``align compare`` shares with it: the grid's runs resolved the
way ``align.train`` (or ``align run``) resolves one, trained one after another in this process,
then evaluated and tabled."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..options import SAMPLING_KEYS
from ..suggest import did_you_mean
from .evaluate import EvalSet, EvalSettings, check_set
from .files import write_text
from .grid import SECTION_AXIS, Cell, Grid, axis_kind, check_axes
from .report import plot, rows, write_tables
from .runner import EVALS, Comparison, Plan, prepare_dir

SOURCE = "align.compare"
PERFORMANCE_ONLY = ("verbose", "data_workers")  # options that may differ on --resume
EVAL_MAX_TOKENS = 256  # the longest greedy answer an eval reward scores, by default
DEMO_EVAL_MAX_TOKENS = 16  # … on the demo model


@dataclass
class ComparisonResult:
    """What a comparison gives back: its directory, the table's rows (as results.json holds
    them), the Markdown table, the plot (None without a second held-out set or matplotlib) and
    whether every run is in the table (False while other processes still train some)."""

    output_dir: Path
    rows: list[dict[str, Any]]
    markdown: str
    plot: Path | None
    complete: bool


def default_output_dir() -> Path:
    return Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def eval_sets(evals: Mapping[str, Any] | Sequence[str] | None, source: str) -> list[EvalSet]:
    """``{"sub": "sub.jsonl"}``, or ``["sub=sub.jsonl", …]`` as ``--eval`` gives them."""
    if not evals:
        raise ConfigError(
            f"{source}: no held-out set to evaluate on: give --eval NAME=PATH (the task being "
            "learned first, then the ones to keep)"
        )
    items: list[tuple[str, Any]] = []
    if isinstance(evals, Mapping):
        items = list(evals.items())
    else:
        for item in evals:
            name, sep, path = str(item).partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"--eval {item!r}: expected NAME=PATH (sub=sub_eval.jsonl)")
            items.append((name.strip(), path.strip()))
    sets, seen = [], set()
    for name, path in items:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(
                f"--eval {name}: a set's name is letters, digits, '-' and '_' (it names columns "
                "and files)"
            )
        if name in seen:
            raise ConfigError(f"--eval {name}: given twice")
        seen.add(name)
        sets.append(EvalSet(name, path if isinstance(path, str | os.PathLike) else path))
    return sets


def in_memory_texts(given: list[EvalSet]) -> dict[str, str]:
    """The sets given as records in memory, as the JSON lines the comparison keeps them in."""
    import json

    texts = {}
    for s in given:
        if isinstance(s.path, str | os.PathLike):
            continue
        records = list(s.path)
        if not records or not all(isinstance(r, Mapping) for r in records):
            raise ConfigError(f"{SOURCE}: evals[{s.name!r}] must be a path or a list of dicts")
        texts[s.name] = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records)
    return texts


def fingerprints(given: list[EvalSet], texts: dict[str, str]) -> dict[str, str]:
    """Each set's SHA-256 (its file's bytes, or its records' JSON lines): compare.json keeps them,
    so --resume refuses sets whose records changed under the same names."""
    import hashlib

    found = {}
    for s in given:
        if s.name in texts:
            found[s.name] = hashlib.sha256(texts[s.name].encode("utf-8")).hexdigest()
        else:
            try:
                found[s.name] = hashlib.sha256(Path(s.path).read_bytes()).hexdigest()
            except OSError as exc:
                raise ConfigError(f"--eval {s.name}={s.path}: cannot read it: {exc}") from None
    return found


def materialise(texts: dict[str, str], recorded: list[EvalSet]) -> None:
    """Write the sets given as records in memory to the files the comparison records for them
    (in its directory: so it can be resumed and read back); on --resume they are there already,
    the same (compare.json's fingerprints say so), and left alone for processes reading them."""
    for s in recorded:
        path = Path(s.path)
        if s.name in texts and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, texts[s.name])


def choose_eval_rewards(registry: Any, items: Sequence[Any] | None, source: str) -> list[Any]:
    """The eval rewards: registered names, or (from Python) functions, each with its default
    options, unweighted (each is reported on its own)."""
    from ..plugins.api import NoOptions
    from ..rollout.functions import FUNCTION_LABEL, function_reward
    from ..rollout.model_reward import is_model_reward
    from ..rollout.rewards import ChosenReward

    chosen: list[Any] = []
    for index, item in enumerate(items or []):
        if isinstance(item, str):
            name = item.strip()
            if is_model_reward(name):
                raise ConfigError(
                    f"{source} {item}: a reward model scores the comparison's answers only "
                    "through a run's --reward; give a registered reward (align rewards)"
                )
            if name not in registry.rewards:
                raise ConfigError(
                    f"{source} {name}: unknown reward.{did_you_mean(name, registry.rewards)} "
                    f"Registered rewards: {', '.join(sorted(registry.rewards))} (align rewards)"
                )
            registered = registry.rewards[name]
            reward = registered.item
            chosen.append(ChosenReward(reward, 1.0, reward.options(), registered.plugin.label))
        elif callable(item):
            reward = function_reward(item, f"{SOURCE}: eval_rewards[{index}]")
            chosen.append(ChosenReward(reward, 1.0, NoOptions(), FUNCTION_LABEL))
        else:
            raise ConfigError(
                f"{source}: expected a registered reward's name or a function, got "
                f"{type(item).__name__}"
            )
    names = [c.name for c in chosen]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: a reward is given twice")
    return chosen


def starting_point(first_spec: Any, registry: Any) -> tuple[str, Any, bool]:
    """The model every run starts from (the demo's built into the cache), the config the
    evaluation reads (with the demo's settings when the demo model is used) and whether it is
    the demo model."""
    from ..loop.setup import apply_demo_defaults

    demo_model = apply_demo_defaults(first_spec, registry)
    return str(first_spec.config.model), first_spec.config, demo_model


def execute(
    out: Path,
    grid: Grid,
    sets: list[EvalSet],
    rewards: list[Any],
    shared: dict[str, Any],
    make_spec: Callable[[Cell, Path, str | None, bool], Any],
    registry: Any,
    resume: bool,
    echo: Callable[[str], None],
    eval_max_tokens: int | None = None,
) -> ComparisonResult:
    """Check every run, create (or check) the directory, train and evaluate, write the tables."""
    from ..api import _process_state_kept, run

    check_axes(grid.axes)
    cells = grid.cells(registry)
    for s in sets:
        if isinstance(s.path, str | os.PathLike):
            check_set(s)
    probe = make_spec(cells[0], out / "runs" / cells[0].name, None, False)
    if probe.given.model is not None:
        raise ConfigError(
            f"{SOURCE}: model is a loaded model, which every run would train in place; save it "
            "(model.save_pretrained(DIR) and its tokenizer) and give DIR"
        )
    start_model, config, demo_model = starting_point(probe, registry)
    if eval_max_tokens is None:  # the demo's answers are a dozen tokens
        eval_max_tokens = DEMO_EVAL_MAX_TOKENS if demo_model else EVAL_MAX_TOKENS
    settings = EvalSettings(
        max_length=config.max_length,
        truncation=config.truncation,
        max_completion_length=eval_max_tokens,
        precision=config.precision,
        trust_remote_code=config.trust_remote_code,
    )
    texts = in_memory_texts(sets)
    reward_names = [c.name for c in rewards]
    plan = Plan(grid, _paths(out, sets), reward_names, shared, settings, fingerprints(sets, texts))
    comparison = Comparison(
        out,
        plan,
        cells,
        make_spec,
        lambda spec: _train(spec, registry, run, _process_state_kept),
        rewards,
        start_model,
        config,
        echo,
    )
    comparison.check()
    prepare_dir(out, plan, resume)
    materialise(texts, plan.evals)
    echo(f"align compare: {len(cells)} runs in {out}")
    states = comparison.run()
    table = rows(states, comparison.start_results())
    names = [s.name for s in sets]
    varied = [key for key, values in grid.axes.items() if len(values) > 1]
    fixed = {key: values[0] for key, values in grid.axes.items() if len(values) == 1}
    text = write_tables(out, table, names, varied, fixed, plan.as_dict())
    picture = plot(out, table, names, varied)
    complete = all(s.results is not None for s in states)
    return ComparisonResult(out.absolute(), table, text, picture, complete)


def _paths(out: Path, sets: list[EvalSet]) -> list[EvalSet]:
    """The sets as compare.json records them: a path absolute, a set in memory by the file it
    is written to."""
    return [
        EvalSet(s.name, str(Path(s.path).absolute()))
        if isinstance(s.path, str | os.PathLike)
        else EvalSet(s.name, str((out / EVALS / "data" / f"{s.name}.jsonl").absolute()))
        for s in sets
    ]


def _train(spec: Any, registry: Any, run: Any, kept: Any) -> None:
    from ..console import tolerant_console

    with kept(), tolerant_console():
        run(spec, registry)


def compare(
    objectives: str | Sequence[str] = "sft",
    model: Any = None,
    data: Any = None,
    *,
    evals: Mapping[str, Any] | None = None,
    eval_rewards: Sequence[str | Callable[..., Any]] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    seeds: int | Sequence[int] = 1,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    eval_max_tokens: int | None = None,
    eval_data: Any = None,
    rewards: Any = None,
    reward_weights: Sequence[float] | None = None,
    **options: Any,
) -> ComparisonResult:
    """Train every objective × grid point × seed on the same model and data, as
    :func:`align.train` would, and evaluate each model on the held-out ``evals``.

    ``objectives``: names (``["sft", "minorsft", "ift"]``); ``grid``: option → values
    (``{"lr": [1e-4, 1e-3], "beta": [0.1, 0.01]}``; an objective's option varies only the
    objectives that have it); ``seeds``: a count (from ``seed``, default 42) or a list;
    ``evals``: name → path or list of records, the task being learned first (the plot's x
    axis), then those to keep; ``eval_rewards``: reward names or functions that score greedy
    answers on every set whose records have their columns, each answer up to
    ``eval_max_tokens`` tokens (256; 16 on the demo model); ``**options``: what every run shares
    (``max_steps=150``, ``batch_size=16``), core and objective options as ``align.train`` takes
    them. ``resume=True`` continues ``output_dir``. Returns a :class:`ComparisonResult`."""
    from ..api import load_registry, resolve_call
    from ..console import echo

    registry = load_registry()
    names = [objectives] if isinstance(objectives, str) else list(objectives)
    if not names:
        raise ConfigError(f"{SOURCE}: objectives is empty")
    for name in names:
        registry.objective(name)  # an unknown objective: the registry's did-you-mean
    from ..aliases import ALIASES
    from ..options import CORE_KEYS

    core = {k: v for k, v in options.items() if k in CORE_KEYS or k in ALIASES}
    targets = {_target(registry, name) for name in names}
    axes: dict[str, list[Any]] = {}
    for key, value in options.items():
        if key in core or key == "seed":
            continue
        if isinstance(value, Mapping) and (key in targets or key in registry.sections):
            # minorsft={"beta": 0.01} and lora={"r": 8}, as align.train takes them
            axes.update({f"{key}.{k}": [v] for k, v in value.items()})
        else:
            axes[key] = [value]
    for key, values in (grid or {}).items():
        if key in axes or key in core:
            raise ConfigError(f"{SOURCE}: {key!r} given as an option and in grid=: give one")
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise ConfigError(f"{SOURCE}: grid[{key!r}] must be a list of values")
        axes[key] = list(values)
    core.pop("seed", None)
    base = int(options.get("seed", 42))
    seed_list = list(range(base, base + seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ConfigError(f"{SOURCE}: seeds is empty")
    spec_grid = Grid(names, axes, seed_list)
    kinds = {key: axis_kind(registry, key, names, f"{SOURCE}:") for key in axes}

    # rewards= and the sampling options: for the on-policy runs of a grid that has some (with
    # none, the run refuses them by name)
    any_on_policy = any(registry.objectives[t].item.on_policy for t in targets)

    def make_spec(cell: Cell, run_dir: Path, resume_from: str | None, overwrite: bool) -> Any:
        target = registry.objectives[_target(registry, cell.objective)].item
        on_policy = target.on_policy or not any_on_policy
        kwargs: dict[str, Any] = {
            k: v for k, v in core.items() if on_policy or k not in SAMPLING_KEYS
        }
        kwargs.update(seed=cell.seed, output_dir=str(run_dir))
        for key, value in cell.values:
            head, dot, tail = key.partition(".")
            if kinds[key] == SECTION_AXIS:  # lora=True and lora.r=8 make one lora={...}
                section = _section_values(registry, head, kwargs.get(head))
                section.update({tail: value} if dot else _section_values(registry, head, value))
                kwargs[head] = section
            elif dot:
                kwargs[tail] = value
            else:
                kwargs[key] = value
        if resume_from:
            kwargs["resume"] = resume_from
        if overwrite:
            kwargs["overwrite"] = True
        return resolve_call(
            registry,
            objective=cell.objective,
            model=model,
            tokenizer=None,
            data=data,
            eval_data=eval_data,
            rewards=rewards if on_policy else None,
            reward_weights=reward_weights if on_policy else None,
            options=None,
            kwargs=kwargs,
        )

    if resume and output_dir is None:
        raise ConfigError(f"{SOURCE}: resume=True continues the comparison in output_dir: give it")
    out = Path(output_dir) if output_dir is not None else default_output_dir()
    sets = eval_sets(evals, SOURCE)
    chosen = choose_eval_rewards(registry, eval_rewards, f"{SOURCE}: eval_rewards")
    shared = {k: _plain(v) for k, v in options.items() if k not in PERFORMANCE_ONLY}
    shared.update(model=_plain(model), data=_plain(data), eval_data=_plain(eval_data))
    if eval_max_tokens is not None and (
        isinstance(eval_max_tokens, bool)
        or not isinstance(eval_max_tokens, int)
        or eval_max_tokens < 1
    ):
        raise ConfigError(f"{SOURCE}: eval_max_tokens must be a positive integer")
    return execute(
        out, spec_grid, sets, chosen, shared, make_spec, registry, resume, echo, eval_max_tokens
    )


def _section_values(registry: Any, name: str, value: Any) -> dict[str, Any]:
    """A section's value as a new mapping of its options: ``True`` is its switch's."""
    from ..api import _section

    if value is None:
        return {}
    value = _section(name, value, registry.sections[name].item)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{SOURCE}: {name} must be True/False or a mapping of its options")
    return dict(value)


def _target(registry: Any, name: str) -> str:
    from .grid import objective_name

    return objective_name(registry, name)


def _plain(value: Any) -> Any:
    """A value as compare.json records it: paths and numbers as they are, records in memory by
    their count."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) and all(isinstance(v, str | os.PathLike) for v in value):
        return [os.fspath(v) for v in value]
    if isinstance(value, list | tuple):
        return f"<{len(value)} records in memory>"
    return f"<{type(value).__name__}>"
