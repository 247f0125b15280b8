"""Errors the user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class AlignError(Exception):
    """Base class for errors caused by input, configuration or installed plugins."""


class ConfigError(AlignError):
    """An invalid option, objective or config file."""


class PluginError(AlignError):
    """A plugin that failed to load, clashes with another, or misbehaves."""


class DataError(AlignError):
    """A record that cannot be used, named by file, location ("line 3", "record 3") and field."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        location: str | None = None,
        field: str | None = None,
    ) -> None:
        where = [str(part) for part in (source, location) if part is not None]
        if source is not None and location is not None and location.startswith("["):
            where = [f"{source}{location}"]  # a record given in memory, as Python indexes it
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.source, self.location, self.field = source, location, field
