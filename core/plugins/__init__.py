"""The plugin API and its machinery: the types plugins register (``api``), the hook specs
(``hookspecs``), discovery and the registry (``registry``), the selected objective's hooks as
the loop calls them (``hooks``), the conformance suite (``testing``) and ``align new-plugin``
(``scaffold``).

``align.plugins`` keeps the registry's public names (``get_registry``, ``load_plugins``, …).
"""

from .registry import (
    CORE_DISTRIBUTION,
    ENTRY_POINT_GROUP,
    FIRST_PARTY_FLAGS,
    FIRST_PARTY_OBJECTIVES,
    FIRST_PARTY_REQUIRES,
    FIRST_PARTY_SECTIONS,
    PLUGINS_ENV,
    PluginInfo,
    PluginRegistry,
    Registered,
    call_impl,
    canonical,
    core_version,
    get_registry,
    install_hint,
    load_plugins,
    reset_registry,
)

__all__ = [
    "CORE_DISTRIBUTION",
    "ENTRY_POINT_GROUP",
    "FIRST_PARTY_FLAGS",
    "FIRST_PARTY_OBJECTIVES",
    "FIRST_PARTY_REQUIRES",
    "FIRST_PARTY_SECTIONS",
    "PLUGINS_ENV",
    "PluginInfo",
    "PluginRegistry",
    "Registered",
    "call_impl",
    "canonical",
    "core_version",
    "get_registry",
    "install_hint",
    "load_plugins",
    "reset_registry",
]
