"""Plugin discovery: entry points in the ``align`` group, in-process plugins, and their errors.

One broken plugin never takes the CLI down: import errors, hooks that match no spec, failed
registrations and objective-name clashes are recorded on the plugin and shown by
``align plugins``; ``align run`` refuses only when the selected objective is affected.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import os
import re
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ..errors import PluginError
from ..options import CORE_KEYS
from ..suggest import did_you_mean
from . import hookspecs
from .api import DataFormat, Generator, Objective, Preset, Reward, Section

ENTRY_POINT_GROUP = "align"
PLUGINS_ENV = "ALIGN_PLUGINS"
CORE_DISTRIBUTION = "align-core"

# Where a first-party objective comes from, for the install hint.
FIRST_PARTY_OBJECTIVES = {
    "sft": "align-plugin-sft",
    "lora-sft": "align-plugin-lora",
    "dpo": "align-plugin-dpo",
    "kto": "align-plugin-kto",
    "orpo": "align-plugin-orpo",
    "grpo": "align-plugin-grpo",
    "online-dpo": "align-plugin-online-dpo",
    "rloo": "align-plugin-rloo",
    "distill": "align-plugin-distillation",
    "minorsft": "align-plugin-minorsft",
    "ift": "align-plugin-ift",
}

# Sections and the flags they add, for the same hint.
FIRST_PARTY_SECTIONS = {"lora": "align-plugin-lora"}
FIRST_PARTY_FLAGS = {
    "--lora": "align-plugin-lora",
    "--adapter": "align-plugin-lora",
    "--load-in-4bit": "align-plugin-lora",
}
# First-party distributions a first-party plugin depends on (its pyproject's dependencies).
FIRST_PARTY_REQUIRES = {"align-plugin-lora": ["align-plugin-sft"]}


def install_hint(distribution: str) -> str:
    """How to install a first-party distribution (``align-plugin-<folder>``).

    None is on the package index until the first release is published (a version tag runs
    ``.github/workflows/release.yml``), so the hint also gives the command that works from a
    source checkout of align, with the first-party plugins it depends on.
    """
    needed = [*FIRST_PARTY_REQUIRES.get(distribution, []), distribution]
    editable = " ".join(f"-e plugins/{d.removeprefix('align-plugin-')}" for d in needed)
    return (
        f"pip install {distribution} once it is released (it is not on PyPI yet); "
        f"from a source checkout of align: pip install {editable}"
    )


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, as ``align plugins`` shows it."""

    name: str
    distribution: str | None
    version: str | None
    module: str
    hooks: list[str] = field(default_factory=list)
    objectives: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    rewards: list[str] = field(default_factory=list)
    generators: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    obj: Any = field(default=None, repr=False)

    @property
    def status(self) -> str:
        return "error" if self.errors else "ok"

    @property
    def label(self) -> str:
        return self.distribution or self.name

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "hooks": self.hooks,
            "objectives": self.objectives,
            "sections": self.sections,
            "formats": self.formats,
            "rewards": self.rewards,
            "generators": self.generators,
            "status": self.status,
            "errors": self.errors,
        }


@dataclass
class Registered:
    """An objective or section together with the plugin that registered it."""

    item: Objective | Section | DataFormat | Reward | Generator
    plugin: PluginInfo


def core_version() -> str:
    try:
        return metadata.version(CORE_DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class PluginRegistry:
    """The plugin manager plus what the plugins registered, with per-plugin errors."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("align")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.objectives: dict[str, Registered] = {}
        self.sections: dict[str, Registered] = {}
        self.formats: dict[str, Registered] = {}
        self.rewards: dict[str, Registered] = {}
        self.generators: dict[str, Registered] = {}
        self.clashes: dict[str, dict[str, list[Registered]]] = {"objective": {}}

    # -- loading -----------------------------------------------------------------------------
    def add(
        self, obj: Any, name: str, distribution: str | None = None, version: str | None = None
    ) -> PluginInfo:
        """Register one plugin object (a module or any object with hookimpls)."""
        if name in self.plugins:  # an in-process plugin named like an entry point, say
            name = next(f"{name}-{n}" for n in range(2, 1000) if f"{name}-{n}" not in self.plugins)
        info = PluginInfo(
            name=name,
            distribution=distribution,
            version=version,
            module=getattr(obj, "__name__", type(obj).__name__),
            obj=obj,
        )
        self.plugins[name] = info
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:  # a hookimpl whose arguments do not match its spec, say
            info.errors.append(_describe(exc))
            return info
        info.hooks = sorted(hc.name for hc in self.pm.get_hookcallers(obj) or [])
        unknown = [h for h in info.hooks if not getattr(self.pm.hook, h).has_spec()]
        for hook in unknown:
            known = [n for n in dir(hookspecs) if n.startswith("align_")]
            info.errors.append(
                f"hook implementation {hook!r} matches no hook spec.{did_you_mean(hook, known)}"
            )
        if unknown:
            self.pm.unregister(obj)
        return info

    def add_failed(
        self, name: str, distribution: str | None, version: str | None, module: str, error: str
    ) -> None:
        self.plugins[name] = PluginInfo(
            name=name, distribution=distribution, version=version, module=module, errors=[error]
        )

    def collect_registrations(self) -> None:
        """Ask each healthy plugin for its formats, objectives and sections, then find clashes
        and objectives whose data format or extra fields cannot be used."""
        from ..data import formats as core_formats
        from ..rollout import generate as core_generators
        from ..rollout import rewards as core_rewards

        core = PluginInfo(name=CORE_DISTRIBUTION, distribution=None, version=None, module="align")
        for fmt in _collect_from(
            core_formats.align_register_formats, DataFormat, "align_register_formats"
        ):
            self.formats[fmt.name] = Registered(fmt, core)
        for reward in _collect_from(
            core_rewards.align_register_rewards, Reward, "align_register_rewards"
        ):
            self.rewards[reward.name] = Registered(reward, core)
        for generator in _collect_from(
            core_generators.align_register_generators, Generator, "align_register_generators"
        ):
            self.generators[generator.name] = Registered(generator, core)
        found_named: dict[str, dict[str, list[Registered]]] = {"reward": {}, "generator": {}}
        found: dict[str, dict[str, list[Registered]]] = {"objective": {}, "section": {}}
        found_formats: dict[str, list[Registered]] = {}
        for info in self.plugins.values():
            if info.errors:
                continue
            try:
                formats = self._collect(info, "align_register_formats", DataFormat)
                objectives = self._collect(info, "align_register_objectives", (Objective, Preset))
                sections = self._collect(info, "align_register_sections", Section)
                rewards = self._collect(info, "align_register_rewards", Reward)
                generators = self._collect(info, "align_register_generators", Generator)
            except Exception as exc:
                info.errors.append(f"registration failed: {_describe(exc)}")
                self.pm.unregister(info.obj)  # none of its hooks may run
                continue
            for fmt in formats:
                info.formats.append(fmt.name)
                found_formats.setdefault(fmt.name, []).append(Registered(fmt, info))
            for kind, items in (("objective", objectives), ("section", sections)):
                for item in items:
                    getattr(info, f"{kind}s").append(item.name)
                    found[kind].setdefault(item.name, []).append(Registered(item, info))
            for kind, items in (("reward", rewards), ("generator", generators)):
                for item in items:
                    getattr(info, f"{kind}s").append(item.name)
                    found_named[kind].setdefault(item.name, []).append(Registered(item, info))

        # A reward or generator name registered twice is nobody's; the core's stay the core's.
        for kind, by_name in found_named.items():
            table = getattr(self, f"{kind}s")
            for name, registrations in by_name.items():
                owners = [r.plugin.label for r in registrations]
                problem = _reward_field_problem(registrations[0].item) if kind == "reward" else None
                if problem is not None:
                    registrations[0].plugin.errors.append(problem)
                    continue
                if name in table:
                    owners.insert(0, table[name].plugin.label)
                elif len(registrations) == 1:
                    table[name] = registrations[0]
                    continue
                for r in registrations:
                    r.plugin.errors.append(
                        f"{kind} {name!r} is registered more than once: {', '.join(owners)}"
                    )

        # A format name registered twice (or a core format's name) is nobody's: neither is used.
        self.format_clashes: dict[str, list[str]] = {}
        for name, registrations in found_formats.items():
            owners = [r.plugin.label for r in registrations]
            if name in self.formats:
                owners.insert(0, self.formats[name].plugin.label)
            elif len(owners) == 1:
                self.formats[name] = registrations[0]
                continue
            else:
                self.format_clashes[name] = owners
            for r in registrations:
                r.plugin.errors.append(
                    f"data format {name!r} is registered more than once: {', '.join(owners)}"
                )

        # A section with a problem unloads its plugin: its model-preparation hooks would run
        # in every run without their options.
        unloaded = set()
        flag_owner: dict[str, str] = {}
        for name, registrations in found["section"].items():
            problem = _name_problem("section", name, registrations, CORE_KEYS, found["objective"])
            for flag in registrations[0].item.flags if problem is None else ():
                if flag.replace("-", "_") in CORE_KEYS or flag in ("config", "set"):
                    problem = f"section {name!r}: flag --{flag} is a core flag"
                elif flag in flag_owner:
                    problem = f"section {name!r}: flag --{flag} is section {flag_owner[flag]!r}'s"
                else:
                    flag_owner[flag] = name
            if problem is None:
                self.sections[name] = registrations[0]
                continue
            for r in registrations:
                r.plugin.errors.append(problem + "; the plugin is not loaded")
                if self.pm.is_registered(r.plugin.obj):
                    self.pm.unregister(r.plugin.obj)
                unloaded.add(id(r.plugin))
        self.formats = {n: r for n, r in self.formats.items() if id(r.plugin) not in unloaded}
        for name, registrations in found["objective"].items():
            registrations = [r for r in registrations if id(r.plugin) not in unloaded]
            if not registrations:  # its only plugin was unloaded
                continue
            problem = _name_problem("objective", name, registrations, CORE_KEYS, {})
            if problem is None and isinstance(registrations[0].item, Objective):
                problem = self._data_problem(registrations[0].item)
            if problem is None:
                self.objectives[name] = registrations[0]
                continue
            if len(registrations) > 1:
                self.clashes["objective"][name] = registrations
            for info in {id(r.plugin): r.plugin for r in registrations}.values():
                info.errors.append(problem)

    def _collect(self, info: PluginInfo, hook_name: str, kind: type | tuple[type, ...]) -> list:
        items: list = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin is info.obj:
                hook = functools.partial(call_impl, impl)
                items += _collect_from(hook, kind, hook_name)
        return items

    def _data_problem(self, objective: Objective) -> str | None:
        """Why an objective's shapes or extra fields cannot be used, or None."""
        from ..data.fields import column_names, reserved_problem
        from ..data.shapes import SHAPES

        if not self.formats_of(objective):
            known = {*SHAPES, *(r.item.shape for r in self.formats.values())}
            unknown = [s for s in objective.shapes if s not in known]
            hint = did_you_mean(unknown[0], known) if unknown else ""
            clashed = ", ".join(self.format_clashes)
            hint += f" (formats registered more than once: {clashed})" if clashed else ""
            return (
                f"objective {objective.name!r}: no registered data format yields its shapes "
                f"({', '.join(objective.shapes)}).{hint} Shapes: {', '.join(sorted(known))}"
            )
        default = self.data_format(objective)  # its demo's and its suite's samples' format
        for name in column_names(objective.fields) if objective.fields is not None else ():
            problem = reserved_problem(name, default.columns, default.name)
            if problem:
                return f"objective {objective.name!r}: {problem}"
        return None

    def formats_of(self, objective: Objective) -> dict[str, Registered]:
        """The registered formats that feed an objective: those of its shapes, by name."""
        return {
            name: registered
            for name, registered in sorted(self.formats.items())
            if registered.item.shape in objective.shapes
        }

    def data_format(self, objective: Objective) -> DataFormat:
        """An objective's default format (its samples are the conformance suite's and the
        demo's records): the core's format of its first shape, else the first registered."""
        feeding = self.formats_of(objective)
        for shape in objective.shapes:
            of_shape = [r for r in feeding.values() if r.item.shape == shape]
            core = [r for r in of_shape if r.plugin.name == CORE_DISTRIBUTION]
            if core or of_shape:
                return (core or of_shape)[0].item
        raise PluginError(self._data_problem(objective) or f"objective {objective.name!r}")

    def choose_format(
        self, objective: Objective, name: str | None, columns: Any, source: str, given: str = ""
    ) -> tuple[Registered, list[str]]:
        """The format that reads a data source for an objective, and the other formats its
        columns also fit (a plugin's, which a core format wins over): ``name`` (``--format``,
        which ``given`` names in errors), or the format of the objective's shapes whose
        identifying columns the source's first record holds. Core formats that fit win over
        plugins' (a plugin installed later does not change how a file is read); among those
        left, one whose identifying set holds each other's by columns the other does not read
        wins (``conversations+chosen+rejected`` over ``chosen+rejected``); else the columns
        are ambiguous. With no match, the one format holding half or
        more of an identifying set reads the file, and its error names the missing column.
        ``columns``: the first record's columns that hold a value (None: no record to tell by).
        """
        from ..errors import ConfigError, DataError

        feeding = self.formats_of(objective)
        shapes = " or ".join(objective.shapes)
        if name is not None:
            given = given or "--format"
            if name in self.format_clashes:
                raise ConfigError(
                    f"{given} {name}: data format {name!r} is registered more than once "
                    f"({', '.join(self.format_clashes[name])}); uninstall one of them"
                )
            registered = self.formats.get(name)
            if registered is None:
                raise ConfigError(
                    f"{given} {name}: unknown data format.{did_you_mean(name, self.formats)} "
                    f"Formats: {', '.join(sorted(self.formats))} (align formats)"
                )
            if name not in feeding:
                raise ConfigError(
                    f"{given} {name}: format {name!r} yields {registered.item.shape} records, "
                    f"and objective {objective.name!r} trains on {shapes}; formats that feed it: "
                    f"{', '.join(feeding)}"
                )
            return registered, []
        if columns is None:
            default = self.data_format(objective)
            return next(r for r in feeding.values() if r.item is default), []
        present = sorted(columns)
        matched = {n: r.item.detected_by(present) for n, r in feeding.items()}
        matched = {n: need for n, need in matched.items() if need is not None}

        def holds(n: str, m: str) -> bool:
            """Whether n's match is more specific than m's, by columns m does not read."""
            wider, other = set(matched[n]), set(matched[m])
            return other < wider and not (wider - other) & set(feeding[m].item.columns)

        # A core format that fits wins over every plugin's: installing a plugin never changes
        # how a file is read (the plugins' that also fit are named, for --format).
        core = {
            n: need for n, need in matched.items() if feeding[n].plugin.name == CORE_DISTRIBUTION
        }
        also = [n for n in matched if n not in core] if core else []
        candidates = core or matched
        widest = [n for n in candidates if all(holds(n, m) for m in candidates if m != n)]
        if widest:
            return feeding[widest[0]], also
        if not matched:  # the format nearest the columns reads them and names what is missing
            overlap = {n: _overlap(r.item, present) for n, r in feeding.items()}
            best = max(overlap.values())
            nearest = [n for n, share in overlap.items() if share == best]
            if best >= 0.5 and len(nearest) == 1:
                return feeding[nearest[0]], []

        def reads(fmt: DataFormat) -> str:
            return " | ".join("+".join(need) for need in fmt.detect) or "(no columns declared)"

        where = f"first record's columns {', '.join(present) or '(none)'}"
        if not matched:
            options = "; ".join(f"{n} reads {reads(r.item)}" for n, r in feeding.items())
            others = [
                f"{n} ({r.item.shape})"
                for n, r in sorted(self.formats.items())
                if n not in feeding and r.item.detected_by(present) is not None
            ]
            hint = (
                f" These columns fit {', '.join(others)}, for objectives of that shape "
                "(align formats)."
                if others
                else ""
            )
            raise DataError(
                f"no data format of objective {objective.name!r} ({shapes}) reads the {where}: "
                f"{options}.{hint} Rename columns with --data-columns (`question=prompt`), or "
                "pick a format with --format",
                source=source,
            )
        fits = ", ".join(f"{n} ({'+'.join(need)})" for n, need in candidates.items())
        raise DataError(
            f"the {where} fit several data formats of objective {objective.name!r}: {fits}; "
            "pick one with --format NAME",
            source=source,
        )

    # -- queries -----------------------------------------------------------------------------
    def objective(self, name: str) -> Registered:
        """The registration of objective ``name``, or a PluginError that says what to do."""
        if name in self.objectives:
            return self.objectives[name]
        if name in self.clashes["objective"]:
            raise PluginError(self.clash_message(name))
        message = f"unknown objective {name!r}."
        choices = {*self.objectives, *FIRST_PARTY_OBJECTIVES} - {name}
        message += did_you_mean(name, choices)
        installed = ", ".join(sorted(self.objectives)) or "none"
        message += f" Installed objectives: {installed}."
        dist = FIRST_PARTY_OBJECTIVES.get(name)
        broken = [p for p in self.plugins.values() if p.errors]
        if dist and any(p.distribution == dist for p in broken):
            message += f" {dist} is installed but failed to load; run `align plugins`."
        elif dist:
            message += f" It is provided by {dist}: {install_hint(dist)}"
        elif broken:
            names = ", ".join(f"{p.label} ({p.errors[0]})" for p in broken)
            message += f" Plugins with errors: {names}; run `align plugins`."
        if os.environ.get(PLUGINS_ENV) is not None:
            message += f" ({PLUGINS_ENV}={os.environ[PLUGINS_ENV]!r} limits which plugins load.)"
        raise PluginError(message)

    def clash_message(self, name: str) -> str:
        """Why objective ``name``, which more than one plugin registers, cannot be used."""
        labels = " and ".join(
            dict.fromkeys(r.plugin.label for r in self.clashes["objective"][name])
        )
        return f"objective {name!r} is registered by both {labels}; uninstall one of them"

    def not_loaded(self) -> list[Any]:
        """The plugins that failed to load (import, core version, registration, hooks): their
        hooks never run; each keeps its errors."""
        return [p for p in self.plugins.values() if p.errors and not self.pm.is_registered(p.obj)]

    def objective_clashes(self) -> list[dict[str, Any]]:
        """Each objective name that several plugins register, as ``align objectives`` lists
        it: who registers it (``registered_by``: distribution and description) and the error
        ``align run --objective NAME`` gives. Such a name is not in :attr:`objectives`, so a
        listing of that table alone leaves it out."""
        return [
            {
                "name": name,
                "registered_by": [
                    {"distribution": r.plugin.label, "description": r.item.description}
                    for r in registrations
                ],
                "error": self.clash_message(name),
            }
            for name, registrations in sorted(self.clashes["objective"].items())
        ]

    def call_objective_hook(self, hook_name: str, registered: Registered, **kwargs: Any) -> Any:
        """Call a firstresult hook on the plugin that registered the objective, and no other."""
        others = [p for p in self.pm.get_plugins() if p is not registered.plugin.obj]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)

    def chain_hook(self, hook_name: str, value_name: str, value: Any, **kwargs: Any) -> Any:
        """Pass ``value`` through every implementation in call order; None keeps the value."""
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(f"{impl.plugin_name}: {hook_name} cannot be a hook wrapper")
            result = call_impl(impl, **{value_name: value}, **kwargs)
            if result is not None:
                value = result
        return value

    def requirements(self) -> list[str]:
        """``name==version`` of align-core and every loaded plugin distribution."""
        reqs = {f"{CORE_DISTRIBUTION}=={core_version()}"}
        for info in self.plugins.values():
            if info.distribution and self.pm.is_registered(info.obj):  # its hooks may run
                reqs.add(f"{info.distribution}=={info.version}")
        return sorted(reqs)


def _overlap(fmt: DataFormat, columns: list[str]) -> float:
    """The largest share of one of the format's identifying column sets that ``columns``
    holds: a record missing one of two columns is nearer that format than one holding one of
    three."""
    return max((len(set(need) & set(columns)) / len(need) for need in fmt.detect), default=0.0)


def _name_problem(
    kind: str, name: str, registrations: list[Registered], core_keys: set[str], objectives: dict
) -> str | None:
    """Why a registered name cannot be used, or None: a clash, or a name the config needs."""
    if not registrations:
        return None
    if len(registrations) > 1:
        labels = ", ".join(r.plugin.label for r in registrations)
        return f"{kind} {name!r} is registered more than once: {labels}"
    if name in core_keys:
        return f"{kind} {name!r} has the name of a core option"
    if name in objectives:
        return f"{kind} {name!r} has the name of an objective"
    return None


def _reward_field_problem(reward: Reward) -> str | None:
    """Why a reward's record fields cannot be used (a name the core's examples and batches
    use, as for an objective's fields), or None."""
    from ..data.fields import column_names, reserved_problem

    for name in column_names(reward.fields) if reward.fields is not None else ():
        problem = reserved_problem(name, ())
        if problem:
            return f"reward {reward.name!r}: {problem}"
    return None


def _collect_from(hook: Any, kind: type | tuple[type, ...], hook_name: str) -> list:
    """What one registration hook registers, each item checked to be of ``kind``."""
    items: list = []
    kinds = kind if isinstance(kind, tuple) else (kind,)

    def register(item: Any) -> None:
        if not isinstance(item, kinds):
            expected = " or ".join(f"align.{k.__name__}" for k in kinds)
            raise TypeError(f"{hook_name} registered {item!r}, expected {expected}")
        items.append(item)

    hook(register=register)
    return items


def call_impl(impl: pluggy.HookImpl, **kwargs: Any) -> Any:
    """Call one hook implementation with the subset of arguments it accepts."""
    return impl.function(*[kwargs[name] for name in impl.argnames])


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def canonical(name: str) -> str:
    """PEP 503 normalisation: ``Align_Plugin.SFT`` and ``align-plugin-sft`` are one name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _selected(env_value: str | None, dist: str | None, ep_name: str) -> bool:
    if env_value is None:
        return True
    wanted = {canonical(part.strip()) for part in env_value.split(",") if part.strip()}
    return bool(wanted & {canonical(dist or ""), canonical(ep_name)})


def _core_requirement_problem(dist: Any) -> str | None:
    """Why the installed align-core does not satisfy what the plugin requires of it, or None.

    A core running from a source tree (version unknown) is not judged; a pre-release or
    development core counts as its release (0.2.0.dev3 as 0.2.0)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    try:
        installed = Version(core_version())
    except InvalidVersion:
        return None
    if installed.local == "unknown":
        return None
    release = Version(installed.base_version)
    for line in (dist.requires or []) if dist is not None else []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if canonical(requirement.name) != CORE_DISTRIBUTION:
            continue
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        if not requirement.specifier.contains(release, prereleases=True):
            return (
                f"incompatible: requires {CORE_DISTRIBUTION}{requirement.specifier}, but "
                f"{CORE_DISTRIBUTION} {installed} is installed; upgrade the plugin or the core"
            )
    return None


def load_plugins(extra: Iterable[Any] = ()) -> PluginRegistry:
    """Load entry-point plugins (limited by ``ALIGN_PLUGINS``), then ``extra`` in-process ones.

    ``ALIGN_PLUGINS`` unset loads every installed plugin; an empty value loads none; otherwise
    it is a comma-separated list of distribution or entry-point names to load.
    """
    registry = PluginRegistry()
    env_value = os.environ.get(PLUGINS_ENV)
    seen: set[tuple[str | None, str, str]] = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.metadata["Name"] if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        key = (dist, ep.name, ep.value)
        if key in seen or not _selected(env_value, dist, ep.name):
            continue
        seen.add(key)
        name = ep.name if ep.name not in registry.plugins else f"{dist}:{ep.name}"
        incompatible = _core_requirement_problem(ep.dist)
        if incompatible:  # never imported: its hooks could expect another core
            registry.add_failed(name, dist, version, ep.value, incompatible)
            continue
        try:
            obj = ep.load()
        except BaseException as exc:  # SyntaxError, ImportError, anything at import time
            if isinstance(exc, KeyboardInterrupt):
                raise
            registry.add_failed(name, dist, version, ep.value, _describe(exc))
            continue
        registry.add(obj, name, dist, version)
    for obj in extra:
        name = getattr(obj, "__name__", None) or type(obj).__name__
        registry.add(obj, name)
    registry.collect_registrations()
    return registry


_registry: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        _registry = load_plugins()
    return _registry


def reset_registry(registry: PluginRegistry | None = None) -> None:
    """Forget (or replace) the process-wide registry; tests use this."""
    global _registry
    _registry = registry
