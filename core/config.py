"""Run configuration: core options, the objective's options and model-preparation sections.

Precedence: defaults < YAML file < command-line flags and ``--set``. In the YAML file core
options sit at top level, the objective's options in a section named after it, and a
model-preparation plugin's options in its own section. Unknown keys are errors with a
"did you mean" suggestion; values are validated by pydantic, never evaluated. Every error names
the source of the value it refuses: the file, the flag (``--lr``) or the ``--set`` item.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .aliases import ALIASES, suggestion, translate
from .data.memory import InMemoryData
from .data.sources import is_hub_id, parse_sources
from .demo import DEMO_MODELS
from .errors import ConfigError, DataError, PluginError
from .model.loading import check_model_source
from .options import CORE_KEYS, SAMPLING_KEYS, TrainConfig
from .plugins.api import Options, Preset, option_keys
from .plugins.registry import FIRST_PARTY_SECTIONS, PluginRegistry, Registered, install_hint
from .suggest import did_you_mean

Sources = dict[str, str]  # option key → where its value came from: run.yaml, --lr, --set k=v
API_SOURCE = "align.train"  # how errors name a value given to align.train


def _core_hint(key: str, allowed: set[str]) -> str:
    return suggestion(key, sorted(allowed))


@dataclass
class Given:
    """What ``align.train`` was handed as objects rather than paths (the CLI hands none): the
    model and tokenizer (``config.model`` then holds the model's ``name_or_path``), and data in
    memory by the label ``config.data``/``config.eval_data`` names it with."""

    model: Any = None
    tokenizer: Any = None
    data: dict[str, InMemoryData] = field(default_factory=dict)

    def named(self, value: Any) -> Any:
        """A split's option as messages name it: records in memory as Python does (``data``),
        anything else as it is."""
        found = self.data.get(value) if isinstance(value, str) else None
        return found.label if found is not None else value

    def as_dict(self) -> dict[str, Any]:
        """What run.json's config records of them: each object's class and ``name_or_path``,
        each split's records as described (their content is in ``data``'s sha256)."""
        out: dict[str, Any] = {}
        for key in ("model", "tokenizer"):
            value = getattr(self, key)
            if isinstance(value, str):  # a tokenizer's own directory or hub id
                out[key] = value
            elif value is not None:
                cls = type(value)
                out[key] = {
                    "class": f"{cls.__module__}.{cls.__qualname__}",
                    "name_or_path": getattr(value, "name_or_path", None) or None,
                }
        for data in self.data.values():
            out[data.label] = data.description
        return out


class RunSpec:
    """A fully validated run: core config, objective options and section options."""

    def __init__(
        self,
        config: TrainConfig,
        objective: Registered,
        options: Options,
        sections: dict[str, Options],
        preset: str | None = None,
        sources: Sources | None = None,
        rewards: list[Any] | None = None,
    ) -> None:
        self.config, self.objective, self.options, self.sections = (
            config,
            objective,
            options,
            sections,
        )
        self.preset = preset
        self.sources = sources or {}  # core option → the file or flag that set it
        self.rewards = rewards or []  # on-policy objectives: align.rollout.rewards.ChosenReward
        self.demo_note: str | None = None  # the demo's settings the run took, in words
        self.given = Given()  # objects align.train was handed instead of paths

    def named(self, key: str) -> str:
        """A core option as a message names it: ``--data``, or ``data (run.yaml)``."""
        return _named(key, self.sources)

    def as_dict(self) -> dict[str, Any]:
        out = self.config.model_dump()
        out[self.objective.item.name] = self.options.model_dump(by_alias=True)
        for name, section in self.sections.items():
            out[name] = section.model_dump(by_alias=True)
        if self.given.as_dict():
            out["in_memory"] = self.given.as_dict()
        if self.rewards:
            out["reward"] = {
                c.name: {"weight": c.weight, **c.options.model_dump(by_alias=True)}
                for c in self.rewards
            }
        return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    return data


def parse_set(items: list[str]) -> dict[str | None, dict[str, Any]]:
    """``KEY=VALUE`` / ``SECTION.KEY=VALUE`` → ``{section or None: {key: value}}``.

    Values are read as YAML (``3``, ``true``, ``[q_proj, v_proj]``), never evaluated.
    """
    return {section: values for section, (values, _) in _parse_set_items(items).items()}


def _parse_set_items(items: list[str]) -> dict[str | None, tuple[dict[str, Any], Sources]]:
    """As :func:`parse_set`, with each key's source: the ``--set`` item that gave its value."""
    out: dict[str | None, tuple[dict[str, Any], Sources]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        section, dot, name = key.strip().rpartition(".")
        values, sources = out.setdefault(section if dot else None, ({}, {}))
        values[name], sources[name] = value, f"--set {item}"
    return out


def _flag(key: str) -> str:
    if key == "rewards":  # repeatable: one --reward per function
        return "--reward"
    return "--" + key.replace("_", "-")


def _validate(
    schema: type[Options], values: dict[str, Any], sources: Sources, context: str = ""
) -> Options:
    """Validate ``values`` against ``schema``; an error names the source of each bad value
    (``sources``: key → ``run.yaml``, ``--lr``, ``--set lora.r=abc``) and then ``context``."""
    known = set(option_keys(schema))
    for key in values:
        if key not in known:
            hint = did_you_mean(key, known)
            choices = ", ".join(sorted(known)) or "none"
            raise ConfigError(
                f"{sources[key]}: {context}unknown option {key!r}.{hint} Options: {choices}"
            )
    try:
        return schema(**values)
    except ValidationError as exc:
        problems: dict[str, list[str]] = {}
        for err in exc.errors():
            if err["loc"] and err["loc"][0] in sources:
                source = sources[str(err["loc"][0])]
            else:  # a check across options: every source of the values involved
                source = ", ".join(dict.fromkeys(sources[k] for k in values)) or "defaults"
            problems.setdefault(source, []).append(_problem(err))
        raise ConfigError(
            "; ".join(f"{source}: {context}{'; '.join(p)}" for source, p in problems.items())
        ) from None


def _problem(err: Any) -> str:
    """One pydantic error as a message says it: ``option 'lr': Input should be greater than 0
    (got -1.0)``. An error whose message shows the value already (``ctx["got"]``: a boolean
    given for a number) does not repeat it."""
    loc = ".".join(str(p) for p in err["loc"])
    if not loc:
        return err["msg"]
    shown = "got" in (err.get("ctx") or {})
    return f"option {loc!r}: {err['msg']}" + ("" if shown else f" (got {err.get('input')!r})")


def _reward_weight(item: str, text: str, source: str) -> float:
    """The WEIGHT of ``--reward NAME=WEIGHT``, a finite number: a NaN or infinite weight makes
    every reward of the sum NaN, which would only fail in the first rollout round."""
    try:
        weight = float(text)
    except ValueError:
        raise ConfigError(f"{source}: {item!r}: the weight after '=' must be a number") from None
    if not math.isfinite(weight):
        raise ConfigError(f"{source}: {item!r}: the weight after '=' must be a finite number")
    return weight


def _named(key: str, sources: Sources) -> str:
    """A core option as an error names it: its flag, or its key and the file that set it."""
    source = sources.get(key, _flag(key))
    return source if source.startswith("--") else f"{key} ({source})"


def _check_reference(config: TrainConfig, objective: Any, options: Any, sources: Sources) -> None:
    if objective.on_policy and config.reference == "precomputed" and "reference" in sources:
        raise ConfigError(
            f"{_named('reference', sources)} precomputed: objective {objective.name!r} samples "
            "new completions every step, which no pass before training can score; use "
            "--reference model or adapter"
        )
    uses_reference = objective.uses_reference(options) or config.eval_deviation
    chosen = [_named(key, sources) for key in ("reference", "ref_model") if key in sources]
    if chosen and not uses_reference:
        unless = (  # a reward model has no log-probs to drift: --eval-deviation is refused
            " (unless --eval-deviation measures the drift from one)"
            if objective.model_class == "causal_lm"
            else f" (it trains a {objective.model_class.replace('_', ' ')} model)"
        )
        raise ConfigError(
            f"{' and '.join(chosen)}: objective {objective.name!r} uses no reference model "
            f"with these options{unless}"
        )
    if config.ref_model and config.reference == "adapter":
        raise ConfigError(
            f"{_named('ref_model', sources)} cannot be used with {_named('reference', sources)} "
            "adapter (the reference is the policy with its adapter disabled)"
        )


def _broken_hint(registry: PluginRegistry) -> str:
    broken = [p.label for p in registry.plugins.values() if p.errors]
    return f" Plugins with errors: {', '.join(broken)} (align plugins)." if broken else ""


def _file_section(file_values: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    values = file_values.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"{where}: section {name!r} must be a mapping of options, got {type(values).__name__}"
        )
    return dict(values)


def _merged(*layers: tuple[dict[str, Any], Sources | str]) -> tuple[dict[str, Any], Sources]:
    """Merge ``(values, source)`` layers, later ones winning; each key keeps the source of the
    value it ends with (``source`` is one label for every key of its layer, or one per key)."""
    values: dict[str, Any] = {}
    sources: Sources = {}
    for layer, source in layers:
        values.update(layer)
        sources.update({k: source if isinstance(source, str) else source[k] for k in layer})
    return values, sources


def resolve(
    registry: PluginRegistry,
    config_file: str | Path | Mapping[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    section_flags: dict[str, dict[str, Any]] | None = None,
) -> RunSpec:
    """Merge defaults, the YAML file, flags and ``--set`` items into a validated RunSpec.

    ``section_flags`` holds the values of plugin sections' own flags (``--lora`` →
    ``{"lora": {"enabled": True}}``); they rank with ``--set``. A preset objective resolves to
    the objective it names, its defaults ranking below everything the user gives. An error
    names the source of the value it refuses: the file, the flag or the ``--set`` item.
    ``config_file`` may also be the mapping a file would hold: ``align.train``'s arguments,
    which errors name as ``align.train``.
    """
    if isinstance(config_file, Mapping):
        file_values, where_file = dict(config_file), API_SOURCE
    else:
        file_values = load_yaml(config_file) if config_file else {}
        where_file = str(config_file)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    file_core = {k: v for k, v in file_values.items() if k in CORE_KEYS or k in ALIASES}
    core, core_sources = _merged(  # TRL's names (learning_rate, --bf16) as align's
        translate(file_core, dict.fromkeys(file_core, where_file)),
        translate(flags, {k: _flag(k) for k in flags}),
    )
    config = _validate(TrainConfig, core, core_sources)
    _check_checkpoint_interval(core_sources)

    try:
        registered = registry.objective(config.objective)
    except PluginError as exc:
        raise PluginError(f"{core_sources.get('objective', 'objective')}: {exc}") from None
    preset = registered.item if isinstance(registered.item, Preset) else None
    if preset is not None:
        registered = registry.objective(preset.objective)
        if isinstance(registered.item, Preset):
            raise ConfigError(f"preset {preset.name!r} names another preset, {preset.objective!r}")
    objective_name = registered.item.name
    if preset is not None and preset.name in file_values:
        raise ConfigError(
            f"{where_file}: {preset.name!r} is a preset of objective {objective_name!r}; put "
            f"its options in a section named {objective_name!r}"
        )
    for name in preset.sections if preset else ():
        if name not in registry.sections:
            raise ConfigError(f"preset {preset.name!r} sets section {name!r}, which no plugin has")
    sections = {name: r.item for name, r in registry.sections.items()}
    set_values = _parse_set_items(sets or [])
    allowed = CORE_KEYS | set(ALIASES) | set(registry.objectives) | set(sections) | {REWARD_SECTION}
    for key in file_values:
        if key not in allowed:
            raise ConfigError(
                f"{where_file}: unknown key {key!r}."
                f"{_core_hint(key, allowed)} Top-level keys are core options, "
                f"objective names and plugin sections (align objectives).{_broken_hint(registry)}"
            )

    top_level, top_sources = set_values.get(None, ({}, {}))
    for key in top_level:
        if key in CORE_KEYS or key in ALIASES:
            raise ConfigError(
                f"{top_sources[key]}: {key!r} is a core option; use "
                f"{_flag(ALIASES[key].key if key in ALIASES else key)} or a "
                "top-level key in the config file"
            )
    for section, (_, section_sources) in set_values.items():
        if section and section.startswith(f"{REWARD_SECTION}."):
            continue  # a reward's options: checked with the rewards
        if section not in (None, objective_name, *sections):
            choices = [objective_name, *sections]
            dist = FIRST_PARTY_SECTIONS.get(section)
            install = f" It is provided by {dist}: {install_hint(dist)}." if dist else ""
            raise ConfigError(
                f"{next(iter(section_sources.values()))}: unknown section {section!r}."
                f"{did_you_mean(section, choices)} Sections: {', '.join(choices)}.{install}"
                f"{_broken_hint(registry)}"
            )
    preset_source = f"preset {preset.name!r}" if preset else ""
    objective_values, objective_sources = _merged(
        (dict(preset.options) if preset else {}, preset_source),
        (_file_section(file_values, objective_name, where_file), where_file),
        set_values.get(None, ({}, {})),
        set_values.get(objective_name, ({}, {})),
    )
    options = _validate(
        registered.item.options,
        objective_values,
        objective_sources,
        f"options of objective {objective_name!r}: ",
    )
    section_options = {}
    for name, section in sections.items():
        flag_values = (section_flags or {}).get(name, {})
        flag_names = {key: f"--{flag}" for flag, key in section.flags.items()}
        values, sources = _merged(
            (dict(preset.sections.get(name, {})) if preset else {}, preset_source),
            (_file_section(file_values, name, where_file), where_file),
            set_values.get(name, ({}, {})),
            (flag_values, {k: flag_names.get(k, f"--{name}") for k in flag_values}),
        )
        section_options[name] = _validate(section.options, values, sources, f"section {name!r}: ")
    _check_reference(config, registered.item, options, core_sources)
    _check_sampling(config, registered.item, core_sources, registry)
    _check_teacher(config, registered.item, core_sources)
    rewards = _resolve_rewards(
        registry, config, registered.item, file_values, set_values, where_file, core_sources
    )
    return RunSpec(
        config,
        registered,
        options,
        section_options,
        preset.name if preset else None,
        core_sources,
        rewards,
    )


REWARD_SECTION = "reward"  # --set reward.NAME.KEY=VALUE; in YAML, reward: {NAME: {KEY: VALUE}}


def _check_checkpoint_interval(sources: Sources) -> None:
    """A checkpoint interval in steps or in minutes, not both."""
    if "save_every" in sources and "save_minutes" in sources:
        raise ConfigError(
            f"{_named('save_every', sources)} and {_named('save_minutes', sources)}: "
            "checkpoint every N steps or every M minutes; give one (--save-every 0 turns "
            "checkpoints off)"
        )


def _check_teacher(config: TrainConfig, objective: Any, sources: Sources) -> None:
    """``--teacher`` is for an objective that distils from one, and such an objective needs it;
    ``--teacher-device``/``--teacher-precision`` go with ``--teacher``."""
    if objective.needs_teacher and not config.teacher:
        raise ConfigError(
            f"objective {objective.name!r} distils from a teacher model: give --teacher PATH "
            "(a hub id or directory sharing the policy's tokenizer; `teacher:` in run.yaml)"
        )
    if config.teacher and not objective.needs_teacher:
        raise ConfigError(
            f"{_named('teacher', sources)}: objective {objective.name!r} uses no teacher model "
            "(distill does)"
        )
    stray = [_named(k, sources) for k in ("teacher_device", "teacher_precision") if k in sources]
    if stray and not config.teacher:
        raise ConfigError(f"{', '.join(stray)}: set for a teacher, and the run has no --teacher")


def _check_sampling(
    config: TrainConfig, objective: Any, sources: Sources, registry: PluginRegistry
) -> None:
    """Sampling options belong to on-policy objectives; the generator must be registered."""
    if objective.on_policy:
        return
    given = [_named(key, sources) for key in SAMPLING_KEYS if key in sources]
    if given:
        objectives = registry.objectives.items()  # presets (lora-sft) have no on_policy
        on_policy = sorted(n for n, r in objectives if getattr(r.item, "on_policy", False))
        raise ConfigError(
            f"{', '.join(given)}: objective {objective.name!r} learns from fixed data and samples "
            f"no completions; these options are for on-policy objectives ({', '.join(on_policy)})"
        )


def _resolve_rewards(
    registry: PluginRegistry,
    config: TrainConfig,
    objective: Any,
    file_values: dict[str, Any],
    set_values: dict[str | None, tuple[dict[str, Any], Sources]],
    where_file: str,
    sources: Sources,
) -> list[Any]:
    """The rewards a run chose (``--reward NAME[=WEIGHT]``), each with its validated options
    (``--set reward.NAME.KEY=VALUE``, or ``reward: {NAME: {KEY: VALUE}}`` in the file)."""
    from .rollout.model_reward import (
        MODEL_PREFIX,
        NAME_RULE,
        ModelReward,
        is_model_reward,
        model_reward,
        split_model_reward,
    )
    from .rollout.rewards import ChosenReward

    file_options = file_values.get(REWARD_SECTION) or {}
    if not isinstance(file_options, dict):
        raise ConfigError(f"{where_file}: {REWARD_SECTION!r} must be a mapping NAME: {{options}}")
    given_sets = {
        section[len(REWARD_SECTION) + 1 :]: values
        for section, values in set_values.items()
        if section and section.startswith(f"{REWARD_SECTION}.")
    }
    if not objective.on_policy:
        stray = [f"--set {REWARD_SECTION}.{n}…" for n in given_sets]
        stray += [f"{REWARD_SECTION} ({where_file})"] if file_options else []
        if stray:
            raise ConfigError(
                f"{', '.join(stray)}: objective {objective.name!r} samples no completions and "
                "reads no rewards"
            )
        return []
    source = _named("rewards", sources) if "rewards" in sources else "rewards"
    generator = config.generator
    if generator not in registry.generators:
        raise ConfigError(
            f"{_named('generator', sources)}: unknown generator {generator!r}."
            f"{did_you_mean(generator, registry.generators)} Registered: "
            f"{', '.join(sorted(registry.generators))}"
        )
    chosen: list[Any] = []
    for item in config.rewards:
        if is_model_reward(item):  # --reward model:PATH[=WEIGHT]
            path, weight_text = split_model_reward(item)
            weight = 1.0 if weight_text is None else _reward_weight(item, weight_text, source)
            reward = model_reward(path, source)
            label = reward.function.label
        else:
            name, sep, weight_text = item.partition("=")
            name = name.strip()
            weight = _reward_weight(item, weight_text, source) if sep else 1.0
            if name not in registry.rewards:
                raise ConfigError(
                    f"{source}: unknown reward {name!r}.{did_you_mean(name, registry.rewards)} "
                    f"Registered rewards: {', '.join(sorted(registry.rewards))} (align rewards), "
                    f"or {MODEL_PREFIX}PATH for a reward model.{_broken_hint(registry)}"
                )
            registered = registry.rewards[name]
            reward, label = registered.item, registered.plugin.label
        name = reward.name
        same = [c for c in chosen if c.name == name]
        if same:
            models = [isinstance(r.function, ModelReward) for r in (reward, same[0].reward)]
            named = f" ({NAME_RULE})" if any(models) else ""
            raise ConfigError(f"{source}: reward {name!r} is given twice{named}")
        values, value_sources = _merged(
            (_file_section(file_options, name, where_file), where_file),
            given_sets.get(name, ({}, {})),
        )
        options = _validate(reward.options, values, value_sources, f"options of reward {name!r}: ")
        chosen.append(ChosenReward(reward, weight, options, label))
    unused = [n for n in {*given_sets, *file_options} if n not in {c.name for c in chosen}]
    if unused:
        models = [
            f"{c.name} ({c.label})" for c in chosen if isinstance(c.reward.function, ModelReward)
        ]
        named = f" (the run's reward models are named {', '.join(models)})" if models else ""
        raise ConfigError(
            f"options for reward {unused[0]!r}, which the run does not use: add --reward "
            f"{unused[0]}{named}"
        )
    return chosen


def check_model_and_data(spec: RunSpec) -> None:
    """A model needs data and data a model; neither is the embedded demo."""
    cfg = spec.config
    if cfg.model in DEMO_MODELS:  # a demo model, on the demo data unless --data gives other
        return
    for given, missing in (("model", "data"), ("data", "model")):
        if getattr(cfg, given) is not None and getattr(cfg, missing) is None:
            raise ConfigError(
                f"{_flag(missing)} is required when {spec.named(given)} is given (run without "
                "both to train the embedded demo, or give --model demo for the demo model)"
            )


def check_inputs(spec: RunSpec) -> None:
    """Refuse a run whose inputs are missing, in seconds and before torch is imported: data
    without a model (or the reverse), a data file or model path that does not exist, a hub id
    the hub cannot serve. Each error names the flag or file that gave the value."""
    cfg = spec.config
    check_model_and_data(spec)
    for key in ("data", "eval_data"):
        value = getattr(cfg, key)
        if not value or value == "demo":  # demo: the bundled data
            continue
        for source in parse_sources(value, "train", None, None, {}, spec.given.data):
            if source.in_memory is not None:
                continue
            path = source.name  # org/name: a dataset on the hub (loaded with the data)
            if not Path(path).exists() and not is_hub_id(path):
                where = f"given by {spec.named(key)}"
                raise DataError(f"no such file or directory ({where})", source=path)
    for key, role in (("model", "model"), ("ref_model", "reference model"), ("teacher", "teacher")):
        if key == "model" and spec.given.model is not None:
            continue  # loaded already
        if getattr(cfg, key) and not (key == "model" and cfg.model in DEMO_MODELS):
            check_model_source(getattr(cfg, key), role, spec.named(key))
