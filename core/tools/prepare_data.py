"""``align prepare``: tokenise a run's data into the cache ahead of the run.

Takes ``align run``'s options; builds (or finds) each split's memory-mapped store in
``$ALIGN_CACHE/data`` and prints the data report, so a cluster job that runs later with the same
data options and cache tokenises nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import RunSpec
from ..errors import ConfigError
from ..plugins.hooks import ObjectiveHooks
from ..plugins.registry import PluginRegistry


def prepare_data(
    spec: RunSpec, registry: PluginRegistry, echo: Callable[[str], None]
) -> dict[str, object]:
    """Build every split's store; returns ``split -> Built``."""
    from ..cache import cache_dir
    from ..loop.data import build_examples, data_sources
    from ..loop.setup import apply_demo_defaults, load_tokenizer

    apply_demo_defaults(spec, registry)
    cfg = spec.config
    if not cfg.data_cache:
        raise ConfigError(
            "align prepare fills the data cache, and --no-data-cache turns it off: drop it"
        )
    tokenizer = load_tokenizer(cfg)
    hooks = ObjectiveHooks(registry, spec, tokenizer)
    built = {}
    for split, sources in data_sources(cfg).items():
        if sources is None:
            continue
        _, report, built[split] = build_examples(hooks, cfg, sources, split)
        echo(f"data {report.summary()}")
        for source, one in zip(sources, built[split], strict=True):
            named = f" ({source.label})" if len(sources) > 1 else ""
            echo(f"data {split}{named}: {one.summary()}")
    echo(
        f"Ready: `align run` with the same data options, model and ALIGN_CACHE ({cache_dir()}) "
        "maps these and tokenises nothing."
    )
    return built
