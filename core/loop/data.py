"""A run's data: each split's sources, their stores (built once per node, or found in the
cache), a mixture's sample, the objective's preparation, and the streamed alternative.

Under several processes the local main process of each node builds a split's store and the
others map it; any failure there is raised on every process, with its message.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..data.build import Built
from ..data.examples import DataReport, RecordTokenizer
from ..data.memory import InMemoryData
from ..data.sources import DataSource, is_mixture, parse_sources
from ..data.store import Examples, StoredExamples
from ..errors import AlignError, ConfigError
from ..plugins.hooks import ObjectiveHooks


def data_sources(
    cfg: Any, in_memory: dict[str, InMemoryData] | None = None
) -> dict[str, list[DataSource] | None]:
    """Each split's data as the options give it: one source (a file, or a hub dataset and its
    split, or records ``in_memory`` holds under the name the option gives), or a mixture of
    several."""
    columns = dict(cfg.data_columns or {})

    def sources(value: Any, split: str) -> list[DataSource] | None:
        if not value:
            return None
        return parse_sources(value, split, cfg.data_subset, cfg.data_revision, columns, in_memory)

    return {
        "train": sources(cfg.data, cfg.data_split),
        "eval": sources(cfg.eval_data, cfg.eval_data_split),
    }


def prepare_split(
    hooks: ObjectiveHooks, cfg: Any, source: DataSource, split: str, data_fingerprint: str
) -> Built:
    """The split's store: the cached one when its key matches, else tokenised now (into the
    cache, or a temporary directory with ``data_cache`` off)."""
    from ..data import build

    fmt, origin, chosen = hooks.format_for(source)
    tokenise = RecordTokenizer(fmt, hooks.tokenizer, cfg.max_length, cfg.truncation, hooks.fields)
    workers = cfg.data_workers or build.default_workers()
    if not cfg.data_cache:
        built = build.build_uncached(
            source.chunks(), tokenise, split, workers, source.label, source.count()
        )
    else:
        key, parts = build.store_key(
            data_fingerprint, hooks.tokenizer, tokenise, origin, source.columns
        )
        found = build.open_cached(key, split)
        built = found or build.build_cached(
            key, source.chunks, tokenise, split, workers, source.label, source.count(), parts
        )
    built.report.format = chosen
    return built


def build_examples(
    hooks: ObjectiveHooks,
    cfg: Any,
    sources: list[DataSource],
    split: str,
    fingerprints: list[str] | None = None,
    state: Any = None,
) -> tuple[Examples, DataReport, list[Built]]:
    """One split's examples, memory-mapped from its stores (one per source; a mixture samples
    them), as the objective's plugin prepares them. Under several processes each node's local
    main process builds the stores and the others map them (a failure there stops them all,
    with its message)."""
    if fingerprints is None:
        fingerprints = [source.fingerprint() for source in sources]
    built = [
        on_local_main(lambda s=source, f=fingerprint: prepare_split(hooks, cfg, s, split, f), state)
        for source, fingerprint in zip(sources, fingerprints, strict=True)
    ]
    parts = [StoredExamples(b.path) for b in built]
    report = dataclasses.replace(built[0].report, split=split)
    if is_mixture(sources):
        from ..data.mixture import mix

        examples, contributed = mix(parts, sources, cfg.seed)
        report = DataReport(split=split)
        for source, fingerprint, b, part, count in zip(
            sources, fingerprints, built, parts, contributed, strict=True
        ):
            report.add(b.report)
            share = {"weight": source.fraction} if source.fraction is not None else {}
            share.update({"samples": source.samples} if source.samples is not None else {})
            report.sources.append(
                {
                    "path": source.label,
                    "sha256": fingerprint,
                    "format": b.report.format,
                    **share,
                    "examples": len(part),
                    "contributed": count,
                }
            )
        report.format = ", ".join(dict.fromkeys(b.report.format for b in built if b.report.format))
    else:
        examples = parts[0]
    examples = hooks.prepare_dataset(examples, split, cfg)
    report.examples = len(examples)
    return examples, report, built


def on_local_main(work: Any, state: Any = None) -> Any:
    """``work()`` on each node's local main process; every process gets its node's result, or
    raises the error any node's work raised."""
    from ..errors import AlignError

    if state is None or state.num_processes == 1:
        return work()
    from accelerate.utils import gather_object

    result: tuple[Any, str | None] = (None, None)
    if state.is_local_main_process:
        try:
            result = (work(), None)
        except AlignError as exc:
            result = (None, f"{type(exc).__name__}\0{exc}")
        except Exception as exc:  # noqa: BLE001 (the others must hear of it, or they wait)
            result = (None, f"RuntimeError\0{type(exc).__name__}: {exc}")
    gathered = gather_object([result])
    failed = next((error for _, error in gathered if error is not None), None)
    if failed is not None:
        raise _shared_error(*failed.split("\0", 1))
    return gathered[state.process_index - state.local_process_index][0]


def _shared_error(kind: str, message: str) -> Exception:
    """An error another process raised, as the same kind of error here (its message already
    names the file, record and field)."""
    from .. import errors

    if kind == "RuntimeError":
        return RuntimeError(message)
    return getattr(errors, kind, errors.AlignError)(message)


def shared_fingerprints(
    sources: dict[str, list[DataSource] | None], state: Any, streaming: bool = False
) -> dict[str, list[str]]:
    """Each split's sources' fingerprints, computed on the main process (a hub dataset is
    loaded there first) and shared. A streamed training split is identified without reading
    it all (``DataSource.stream_fingerprint``)."""
    from accelerate.utils import broadcast_object_list

    def fingerprint(split: str, source: DataSource) -> str:
        streamed = streaming and split == "train"
        return source.stream_fingerprint() if streamed else source.fingerprint()

    result: list[Any] = [None, None]
    if state.is_main_process:
        try:
            result[0] = {
                split: [fingerprint(split, source) for source in found]
                for split, found in sources.items()
                if found
            }
        except AlignError as exc:
            result[1] = (type(exc).__name__, str(exc))
    if state.num_processes > 1:
        broadcast_object_list(result)
    if result[1] is not None:
        raise _shared_error(*result[1])
    return result[0]


def check_streaming(spec: Any, hooks: ObjectiveHooks) -> None:
    """What ``--streaming`` cannot do, refused before the model loads: it has no end to count
    epochs by, no whole split to score or prepare up front."""
    import warnings

    cfg, objective = spec.config, spec.objective.item
    sources = data_sources(cfg, spec.given.data)["train"]
    problems = []
    if cfg.max_steps is None:
        problems.append("give --max-steps (a stream has no known length)")
    if sources is not None and is_mixture(sources):
        problems.append("stream one source (a mixture is sampled from whole splits)")
    if cfg.group_by_length:
        problems.append("drop --group-by-length (it sorts whole runs of batches)")
    if objective.on_policy:
        problems.append(f"objective {objective.name!r} samples from prompts: drop --streaming")
    uses_reference = objective.needs_reference or cfg.eval_deviation
    if uses_reference and (cfg.reference or "precomputed") == "precomputed":
        problems.append(
            "use --reference model (or adapter): a precomputed reference scores every example "
            "before training"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = hooks.prepare_dataset([], "train", cfg)
        whole_split = len(prepared) != 0
    except ConfigError:
        raise
    except AlignError:  # it needs examples to prepare (KTO's partners)
        whole_split = True
    if whole_split:
        problems.append(
            f"objective {objective.name!r} prepares the whole split before training "
            "(align_prepare_dataset)"
        )
    if problems:
        raise ConfigError("--streaming: " + "; ".join(problems))


def streaming_batches(
    hooks: ObjectiveHooks,
    cfg: Any,
    state: Any,
    in_memory: dict[str, InMemoryData] | None = None,
) -> Any:
    """The training split's micro-batches, streamed."""
    from ..data import build
    from ..data.streaming import StreamingBatches

    [source] = data_sources(cfg, in_memory)["train"]
    fmt, _, chosen = hooks.format_for(source, streaming=True)
    tokenise = RecordTokenizer(fmt, hooks.tokenizer, cfg.max_length, cfg.truncation, hooks.fields)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # this node's training processes
    workers = cfg.data_workers or max(1, build.default_workers() // max(1, local))
    stream = StreamingBatches(
        source,
        tokenise,
        cfg.batch_size,
        hooks.build_batch,
        state,
        cfg.seed,
        cfg.shuffle_buffer,
        workers,
    )
    stream.report.format = chosen
    return stream
