"""The Python API: ``align.train(objective=…, model=…, data=…, rewards=[…], **options)``.

It resolves its arguments with the same :func:`align.config.resolve` as ``align run`` (the same
validation, defaults and did-you-mean errors, raised as :class:`align.ConfigError` and its
kind), then both run the resolved spec through :func:`run`. Objects stand in for paths: a
loaded model and tokenizer, records as a list of dicts or a ``datasets.Dataset``, rewards as
Python functions. Nothing here calls ``sys.exit`` or installs a signal handler of its own; the
run's handlers (Ctrl-C stops after the step, with a checkpoint) are installed only from the main
thread and the previous ones restored when it ends, however it ends. torch is imported when a
run starts, not with ``align``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .aliases import ALIASES
from .config import (
    API_SOURCE,
    REWARD_SECTION,
    Given,
    RunSpec,
    check_inputs,
)
from .config import resolve as resolve_options
from .data.memory import InMemoryData, is_dataset, is_record_list
from .demo import DEMO_MODELS
from .errors import ConfigError, PluginError
from .options import CORE_KEYS
from .plugins.api import Preset, option_keys
from .plugins.registry import PluginRegistry, get_registry
from .suggest import did_you_mean

# align.train's own arguments, which are not options.
ARGUMENTS = ("objective", "model", "tokenizer", "data", "eval_data", "rewards", "reward_weights")


@dataclass
class TrainResult:
    """What a finished run gives back.

    ``run_dir``: the run's directory, absolute (run.json, metrics.jsonl, checkpoints);
    ``final_dir``: the saved model (``run_dir / "final"``, an adapter with LoRA); ``metrics``:
    the last logged training row (``loss``, ``step``, …) and the final evaluation's
    ``eval_*`` values; ``model``: the trained model in memory, unwrapped (a PEFT model with its
    adapter for LoRA), in eval mode, on the device it trained on; ``tokenizer``: the tokenizer
    it trained with (a pad token set, right padding)."""

    run_dir: Path
    final_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)


def train(
    objective: str = "sft",
    model: Any = None,
    data: Any = None,
    *,
    tokenizer: Any = None,
    eval_data: Any = None,
    rewards: Sequence[str | Callable[..., Any]] | str | Callable[..., Any] | None = None,
    reward_weights: Sequence[float] | None = None,
    options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``objective``, as ``align run`` does, and return the
    result. docs/python-api.md describes every argument; in short:

    ``model``: a hub id or directory, or a loaded ``transformers`` model (trained in place);
    ``tokenizer``: a path or a tokenizer object (default: the model's); ``data`` and
    ``eval_data``: a path or hub id, a list of dicts, a ``datasets.Dataset``, or a list of
    paths and datasets (a mixture); ``rewards`` (on-policy objectives): registered names
    (``"addition"``, ``"length=0.5"``) and Python functions ``f(prompts, completions,
    **kwargs) -> list[float]``, with TRL's ``reward_weights``; ``**kwargs``: core options
    (``lr=1e-5``, ``max_steps=100``), the objective's options (``beta=0.1``, or
    ``options={…}``) and plugin sections (``lora=True`` or ``lora={"enabled": True, "r": 8}``).

    Raises :class:`align.ConfigError`, :class:`align.DataError` or :class:`align.PluginError`
    for bad input, ``align.RunStopped`` when Ctrl-C (SIGINT) or SIGTERM stopped
    the run after a step and saved a checkpoint."""
    registry = load_registry()
    spec = resolve_call(
        registry,
        objective=objective,
        model=model,
        tokenizer=tokenizer,
        data=data,
        eval_data=eval_data,
        rewards=rewards,
        reward_weights=reward_weights,
        options=options,
        kwargs=kwargs,
    )
    from .loop.launch import needs_launch

    if needs_launch(spec.config.num_processes):
        raise ConfigError(
            f"num_processes={spec.config.num_processes}: align.train trains in this process and "
            "cannot start others (Python objects do not travel to them). Launch the script "
            "itself with `torchrun --nproc_per_node N` or `accelerate launch` (each process "
            "then calls align.train), or use `align run --num-processes N`."
        )
    check_inputs(spec)  # a missing path: refused before torch is imported
    from .loop.stopping import RunStopped

    try:
        with _process_state_kept():
            return run(spec, registry)
    except RunStopped as exc:
        if exc.run_dir is None:
            raise
        raise RunStopped(
            f"{exc} From Python: call align.train again with the same arguments and "
            f"resume=True, output_dir={str(exc.run_dir)!r} (a model object was trained in "
            "place: pass it as it was loaded).",
            exc.exit_code,
            exc.run_dir,
        ) from None


def run(spec: RunSpec, registry: PluginRegistry) -> TrainResult:
    """Train a resolved spec (``align run`` and :func:`train` both end here): the output
    directories it created are removed if it fails before starting."""
    from .loop.setup import removed_if_unstarted
    from .loop.train import run_training

    with removed_if_unstarted():
        training = run_training(spec, registry)
    last = training.metrics_log.last
    model = training.accelerator.unwrap_model(training.model, keep_fp32_wrapper=False)
    model.eval()
    out = training.out.absolute()  # still right after the caller changes directory
    result = TrainResult(
        run_dir=out,
        final_dir=out / "final",
        metrics={**last.get("eval", {}), **last.get("train", {})},
        model=model,
        tokenizer=training.tokenizer,
    )
    accelerator = training.accelerator
    del training  # the optimizer's state, a reference model: freed now, not at the next run
    if "WORLD_SIZE" not in os.environ:  # a launcher's worker exits now; its process group is
        accelerator.free_memory()  # torn down, which DeepSpeed's engine.destroy() would need
    return result


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """A run leaves the process as it found it, for the next call in the same notebook:
    Accelerate's process-wide state is reset after it (else a second run with another
    ``precision`` is refused: "AcceleratorState has already been initialized"), and the
    transformers progress bars a run turns off are turned on again. Under a launcher
    (``WORLD_SIZE``) the state is the launcher's and stays."""
    from transformers.utils import logging as transformers_logging

    from .plugins.testing import reset_accelerate

    bars = transformers_logging.is_progress_bar_enabled()
    launched = "WORLD_SIZE" in os.environ
    if not launched:
        reset_accelerate()
    try:
        yield
    finally:
        if not launched:
            reset_accelerate()
        if bars:
            transformers_logging.enable_progress_bar()


def load_registry() -> PluginRegistry:
    """The plugin registry; a warning names each plugin that failed to load."""
    registry = get_registry()
    for info in registry.not_loaded():
        warnings.warn(
            f"plugin {info.label} ({info.module}) is not loaded: {info.errors[0]}", stacklevel=3
        )
    return registry


# -- arguments to a RunSpec ------------------------------------------------------------------
def resolve_call(
    registry: PluginRegistry,
    *,
    objective: str,
    model: Any,
    tokenizer: Any,
    data: Any,
    eval_data: Any,
    rewards: Any,
    reward_weights: Any,
    options: Mapping[str, Any] | None,
    kwargs: dict[str, Any],
) -> RunSpec:
    """``align.train``'s arguments as the mapping a run.yaml would hold, resolved by the same
    :func:`align.config.resolve`; then the objects that stand in for paths put in place."""
    given = Given()
    for alias, argument in (("model_name_or_path", "model"), ("dataset_name", "data")):
        if alias in kwargs:  # TRL's names for the arguments: taken as the arguments
            if (model if argument == "model" else data) is not None:
                raise ConfigError(f"{API_SOURCE}: {argument} and {alias} both given: give one")
            if argument == "model":
                model = kwargs.pop(alias)
            else:
                data = kwargs.pop(alias)
    values: dict[str, Any] = {"objective": objective}
    target = _objective_name(registry, objective)
    objective_keys = _objective_keys(registry, target)
    sections = dict(registry.sections)
    objective_values: dict[str, Any] = {}
    if options is not None:
        if not isinstance(options, Mapping):
            raise ConfigError(f"{API_SOURCE}: options must be a mapping, got {options!r}")
        objective_values.update(options)
    for key, value in kwargs.items():
        if key in CORE_KEYS or key in ALIASES:  # TRL's names (learning_rate=…) too
            values[key] = _plain(value)
        elif key in sections:
            values[key] = _section(key, value, sections[key].item)
        elif key == REWARD_SECTION or (target is not None and key == target):
            values[key] = value
        elif key in objective_keys:
            if key in objective_values:
                raise ConfigError(
                    f"{API_SOURCE}: {key!r} given as a keyword and in options=: give one"
                )
            objective_values[key] = value
        else:
            known = {*CORE_KEYS, *ALIASES, *objective_keys, *sections}
            known |= {*ARGUMENTS, "options"}
            what = f"the options of objective {target!r}" if target else "objective options"
            listed = f" ({', '.join(sorted(sections))})" if sections else ""
            raise ConfigError(
                f"{API_SOURCE}: unknown option {key!r}.{did_you_mean(key, known)} It takes core "
                f"options (align run --help), {what} and plugin sections{listed}."
            )
    if objective_values:
        if target is None:  # an unknown objective: resolve names it
            values.update(objective_values)
        else:
            section = dict(values.get(target) or {})
            twice = sorted(set(section) & set(objective_values))
            if twice:
                raise ConfigError(
                    f"{API_SOURCE}: {', '.join(map(repr, twice))} given in {target}= and as a "
                    "keyword or in options=: give one"
                )
            values[target] = {**section, **objective_values}
    if model is not None:
        values["model"] = _model(model, given)
    if tokenizer is not None:
        given.tokenizer = _tokenizer(tokenizer)
    elif given.model is not None and not getattr(given.model, "name_or_path", ""):
        raise ConfigError(
            f"{API_SOURCE}: the model object has no name_or_path to load its tokenizer from: "
            "give tokenizer= (a tokenizer object or its directory)"
        )
    has_model, has_data = model is not None, data is not None
    if has_model != has_data and values.get("model") not in DEMO_MODELS:
        given_one, missing = ("model", "data") if has_model else ("data", "model")
        raise ConfigError(
            f"{API_SOURCE}: {missing} is required when {given_one} is given (leave both out to "
            "train the embedded demo, or give model='demo' for the demo model)"
        )
    for key, value in (("data", data), ("eval_data", eval_data)):
        if value is not None:
            values[key] = _data(key, value, given)
    callables = _rewards(rewards, reward_weights, values)
    spec = resolve_options(registry, values)
    spec.given = given
    _refuse_a_second_adapter(spec, registry)
    if callables:
        spec.rewards = _with_functions(spec, callables)
    return spec


def _refuse_a_second_adapter(spec: RunSpec, registry: PluginRegistry) -> None:
    """A model object that already carries a PEFT adapter (a LoRA run trains its model in
    place: ``result.model`` of it, or the same object passed again) with a section that would
    inject another: PEFT would only warn, and the run would train on top of the first."""
    from .loop.describe import active_sections

    model = spec.given.model
    on = active_sections(spec, registry)
    if model is not None and getattr(model, "peft_config", None) and on:
        raise ConfigError(
            f"{API_SOURCE}: the model already carries a PEFT adapter (a LoRA run trains the model "
            f"object in place), and {on[0][1]} would inject another on top of it: pass the model "
            f"as it was loaded, or train this one without {on[0][0]}="
        )


def _objective_name(registry: PluginRegistry, name: str) -> str | None:
    """The objective ``name`` trains (a preset's target), or None when none is registered."""
    try:
        registered = registry.objective(name)
    except (PluginError, ConfigError):
        return None
    item = registered.item
    return item.objective if isinstance(item, Preset) else item.name


def _objective_keys(registry: PluginRegistry, name: str | None) -> set[str]:
    if name is None or name not in registry.objectives:
        return set()
    return set(option_keys(registry.objectives[name].item.options))


def _plain(value: Any) -> Any:
    """A path as the string an option holds; a list or tuple of them likewise."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _section(name: str, value: Any, section: Any) -> Any:
    """``lora=True`` is the section's switch (``--lora``); a mapping sets its options."""
    if isinstance(value, bool):
        switch = section.flags.get(name)
        if switch is None:
            raise ConfigError(
                f"{API_SOURCE}: section {name!r} has no on/off switch: give a mapping of its "
                "options"
            )
        return {switch: value}
    return value


def _model(model: Any, given: Any) -> str:
    """A path or hub id as given; a loaded model kept as the object, named by its
    ``name_or_path`` (or its class) in the run's config."""
    if isinstance(model, str | os.PathLike):
        return os.fspath(model)
    if not (hasattr(model, "config") and callable(getattr(model, "forward", None))):
        raise ConfigError(
            f"{API_SOURCE}: model must be a hub id, a directory or a loaded transformers model "
            f"(PreTrainedModel), got {type(model).__name__}"
        )
    given.model = model
    return getattr(model, "name_or_path", "") or f"({type(model).__name__} in memory)"


def _tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, str | os.PathLike):
        return os.fspath(tokenizer)
    if not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
        raise ConfigError(
            f"{API_SOURCE}: tokenizer must be a directory, a hub id or a loaded transformers "
            f"tokenizer, got {type(tokenizer).__name__}"
        )
    return tokenizer


def _memory_label(name: str) -> str:
    """The string a split's option holds for records in memory: one no path is spelt as (a
    folder named ``data`` stays a folder), which ``given.data`` maps to the records; messages
    name them as Python does (``data[3]``)."""
    return f"<in memory: {name}>"


def _data(key: str, value: Any, given: Any) -> Any:
    """A split's data as the option holds it: a path as a string, records in memory as the
    label ``given.data`` holds them under (:func:`_memory_label` of ``data``, or of ``data[1]``
    in a mixture)."""
    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    if is_dataset(value) or is_record_list(value):
        given.data[_memory_label(key)] = InMemoryData(key, value)
        return _memory_label(key)
    if type(value).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise ConfigError(
            f"{API_SOURCE}: {key} is a {type(value).__name__}: pick a split ({key}=ds['train'])"
        )
    if isinstance(value, list | tuple):
        if not value:
            raise ConfigError(f"{API_SOURCE}: {key} is an empty list")
        items = []
        for index, item in enumerate(value):
            if isinstance(item, str | os.PathLike):
                items.append(os.fspath(item))
            elif is_dataset(item):
                label = f"{key}[{index}]"
                given.data[_memory_label(label)] = InMemoryData(label, item)
                items.append(_memory_label(label))
            else:
                raise ConfigError(
                    f"{API_SOURCE}: {key}[{index}]: expected records (every item a dict), or "
                    "a mixture of paths and datasets.Dataset objects; got "
                    f"{type(item).__name__} among them"
                )
        return items
    raise ConfigError(
        f"{API_SOURCE}: {key} must be a path or hub id, a list of dicts, a datasets.Dataset or "
        f"a list of paths and datasets, got {type(value).__name__}"
    )


def _rewards(rewards: Any, weights: Any, values: dict[str, Any]) -> dict[int, Any]:
    """Put the registered reward names (with their weights) among the options, for resolve to
    check; return the functions by their place in ``rewards``, with their weights."""
    from .rollout.functions import function_weight

    if rewards is None:
        if weights is not None:
            raise ConfigError(f"{API_SOURCE}: reward_weights without rewards")
        return {}
    items = [rewards] if isinstance(rewards, str) or callable(rewards) else list(rewards)
    if weights is not None:
        if not isinstance(weights, list | tuple):
            raise ConfigError(
                f"{API_SOURCE}: reward_weights must be a list of numbers, one per reward, got "
                f"{weights!r}"
            )
        weights = list(weights)
        if len(weights) != len(items):
            raise ConfigError(
                f"{API_SOURCE}: reward_weights has {len(weights)} weights for {len(items)} "
                "rewards: give one per reward, in order"
            )
    names, functions = [], {}
    for index, item in enumerate(items):
        where = f"{API_SOURCE}: rewards[{index}]"
        weight = function_weight(weights[index], f"{where}'s weight") if weights else None
        if isinstance(item, str):
            if weight is not None and "=" in item:
                raise ConfigError(
                    f"{where}: {item!r} has a weight and reward_weights gives another: use one"
                )
            names.append(item if weight is None else f"{item}={weight!r}")
        elif hasattr(item, "config") and hasattr(item, "save_pretrained"):
            raise ConfigError(
                f"{where}: a loaded model ({type(item).__name__}) is no reward function: save "
                "a reward model with its tokenizer (save_pretrained(DIR) on both) and give "
                '"model:DIR", as --reward model:DIR'
            )
        elif callable(item):
            functions[index] = (item, 1.0 if weight is None else weight)
        else:
            raise ConfigError(
                f"{where}: expected a registered reward's name or a function, got "
                f"{type(item).__name__}"
            )
    values["rewards"] = names
    return functions


def _with_functions(spec: RunSpec, functions: dict[int, Any]) -> list[Any]:
    """The run's rewards in the order given: the registered ones as resolve chose them, the
    functions as :class:`align.Reward` s of their own."""
    from .plugins.api import NoOptions
    from .rollout.functions import FUNCTION_LABEL, function_reward
    from .rollout.rewards import ChosenReward

    registered = iter(spec.rewards)
    count = len(spec.rewards) + len(functions)
    chosen: list[Any] = []
    for index in range(count):
        if index in functions:
            function, weight = functions[index]
            reward = function_reward(function, f"{API_SOURCE}: rewards[{index}]")
            chosen.append(ChosenReward(reward, weight, NoOptions(), FUNCTION_LABEL))
        else:
            chosen.append(next(registered))
    seen: set[str] = set()
    for index, c in enumerate(chosen):
        if c.name in seen:
            raise ConfigError(
                f"{API_SOURCE}: rewards[{index}]: two rewards are named {c.name!r} (a function "
                "is named by its __name__; rename one)"
            )
        seen.add(c.name)
    return chosen
