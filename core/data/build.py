"""Records to a memory-mapped store of tokenised examples: once, in parallel, cached.

The store of a split lives in ``$ALIGN_CACHE/data/<key>``. The key is a hash of everything that
decides the examples: the data (its bytes' sha256, or a hub dataset's fingerprint), the
tokenizer (its vocabulary, rules, special tokens and chat template), the data format (the
plugin that registered it, its columns, schema and code), the objective's extra fields,
``max_length``, ``truncation``, the column mapping and the versions of align and of the store
layout. A run whose key matches
maps the store and tokenises nothing; any change is a new key, so a stale store is never read.
A store is written into a temporary directory beside its final place and renamed when complete,
so a crash leaves no half a store where a run would read it.

Tokenising runs in ``workers`` forked processes, each given chunks of records in order (a
bounded number in flight, so memory does not grow with the data); the examples come back in
record order, so the store is the same whatever the number of workers. The first bad record
stops every worker, and its error names the file, the line or record and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

from ..cache import cache_dir
from ..errors import DataError
from .examples import DataReport, RecordTokenizer, no_examples
from .records import JsonLines, Record
from .store import STORE_VERSION, Block, StoredExamples, StoreWriter, encode_block

Chunk = list[Record] | JsonLines  # records, or JSON Lines a worker parses

CHUNK = 256  # records a worker tokenises at a time
BUILDING = ".building-"  # prefix of the temporary directory a store is written to


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's output: its vocabulary and rules (the fast
    tokenizer's serialised form, or a slow one's vocabulary), special tokens, chat template and
    the options that add BOS or EOS."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    if getattr(tokenizer, "is_fast", False):
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "options": {
            k: v
            for k, v in sorted(getattr(tokenizer, "init_kwargs", {}).items())
            if k.startswith(("add_", "clean_up", "legacy", "split_special", "do_lower"))
            and isinstance(v, (bool, int, str, type(None)))
        },
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def store_key(
    data_fingerprint: str,
    tokenizer: Any,
    tokenise: RecordTokenizer,
    format_origin: str,
    columns: dict[str, str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The cache key of a split's store, and the parts it was made from (kept in its meta)."""
    from ..loop.rundir import written_by

    fields = tokenise.fields.model_json_schema() if tokenise.fields is not None else None
    parts = {
        "store_version": STORE_VERSION,
        "align": written_by(),
        "data": data_fingerprint,
        "tokenizer": tokenizer_identity(tokenizer),
        "format": format_identity(tokenise.format, format_origin),
        "fields": fields,
        "max_length": tokenise.max_length,
        "truncation": tokenise.truncation,
        "columns": dict(sorted((columns or {}).items())),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], parts


def format_identity(fmt: Any, origin: str) -> dict[str, Any]:
    """A data format's name, plugin and version, columns, schema, and a hash of its ``groups``
    function's code: a format edited in an editable install without a new version is still
    another key."""
    digest = hashlib.sha256()
    code = getattr(fmt.groups, "__code__", None)
    if code is not None:
        _hash_code(code, digest)
    schema = fmt.schema.model_json_schema() if fmt.schema is not None else None
    return {
        "name": fmt.name,
        "from": origin,
        "columns": list(fmt.columns),
        "schema": schema,
        "code": digest.hexdigest(),
    }


def _hash_code(code: Any, digest: Any) -> None:
    """A function's bytecode, constants and names (nested functions' too), never an address."""
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _hash_code(const, digest)
        else:
            digest.update(repr(const).encode())


@dataclass
class Built:
    """A split's store and what its building reported."""

    path: Path
    report: DataReport
    key: str | None  # None: not cached
    cache_hit: bool
    seconds: float = 0.0
    workers: int = 0

    def summary(self) -> str:
        if self.cache_hit:
            return f"tokenised examples from the cache ({self.path})"
        where = f"cached in {self.path}" if self.key else "not cached (data_cache off)"
        workers = f"{self.workers} worker{'s' * (self.workers != 1)}"
        return f"tokenised in {self.seconds:.1f}s ({workers}); {where}"


# -- tokenising in worker processes ----------------------------------------------------------------
_WORKER: RecordTokenizer | None = None  # set in the parent before the workers are forked


def _tokenise_chunk(chunk: Chunk) -> tuple[Block, DataReport]:
    """A chunk's examples, encoded for the store (a few byte strings, cheap to send back)."""
    records = chunk.records() if isinstance(chunk, JsonLines) else chunk
    report = DataReport(split="")
    examples, sources = [], []
    for record in records:
        found = _WORKER.examples(record, report)
        examples += found
        sources += [record] * len(found)
    try:
        return encode_block(examples), report
    except (TypeError, ValueError):  # name the example that cannot be stored
        for example, record in zip(examples, sources, strict=True):
            try:
                encode_block([example])
            except (TypeError, ValueError) as exc:
                raise record.error(f"cannot be stored: {exc}") from None
        raise


def tokenised_chunks(
    chunks: Iterator[Chunk], tokenise: RecordTokenizer, workers: int
) -> Iterator[tuple[Block, DataReport]]:
    """``(examples, report)`` of each chunk of records, in order: in ``workers`` forked
    processes, or in this one for ``workers`` 1."""
    return in_order(_tokenise_chunk, chunks, tokenise, workers, ahead=3 * workers)


def tokenise_each(records: list[Record]) -> tuple[list[list[dict[str, Any]]], DataReport]:
    """Each record's examples (a list per record), and the chunk's report."""
    report = DataReport(split="")
    return [_WORKER.examples(record, report) for record in records], report


def in_order(
    work: Callable[[Any], Any],
    chunks: Iterable[Any],
    tokenise: RecordTokenizer,
    workers: int,
    ahead: int,
) -> Iterator[Any]:
    """``work(chunk)`` of each chunk, in order, with ``tokenise`` as the workers' tokeniser:
    in ``workers`` forked processes with at most ``ahead`` chunks in flight (the records are not
    all read ahead), or in this process for ``workers`` 1. Closing the iterator stops the
    workers."""
    global _WORKER
    _WORKER = tokenise
    try:
        if workers <= 1:
            for chunk in chunks:
                yield work(chunk)
            return
        with worker_pool(workers) as pool:  # terminated on exit
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(work, (chunk,)))
                if len(pending) >= ahead:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _WORKER = None


def worker_pool(workers: int) -> Any:
    """A pool of ``workers`` forked processes, each of which exits when this process dies (a
    killed run leaves no workers behind)."""
    import multiprocessing

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    context = multiprocessing.get_context("fork")
    return context.Pool(workers, initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent: int) -> None:
    import gc
    import signal
    import threading
    import time

    # A fork inherits the run's handlers, which turn SIGTERM into "stop after this step": the
    # pool's terminate() would then wait forever for a worker that never stops. A worker dies
    # on SIGTERM, and leaves SIGINT (Ctrl-C reaches the whole process group) to the parent,
    # which stops the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # Tokenising makes no reference cycles, only short-lived lists and dicts: the cyclic
    # collector would walk them thousands of times for nothing (5% of a worker's time).
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def record_chunks(records: Iterable[Record]) -> Iterator[list[Record]]:
    """Records in chunks of ``CHUNK``."""
    records = iter(records)
    while chunk := list(islice(records, CHUNK)):
        yield chunk


def _size(chunk: Chunk) -> int:
    return len(chunk.lines) if isinstance(chunk, JsonLines) else len(chunk)


def write_store(
    chunks: Iterable[Chunk],
    tokenise: RecordTokenizer,
    path: Path,
    split: str,
    workers: int,
    source: str,
    total: int | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[DataReport, int]:
    """Tokenise ``records`` into a new store at ``path``: the split's report, and the number of
    processes that tokenised (1 for small data: forking costs more than it saves)."""
    from tqdm.auto import tqdm

    chunks = iter(chunks)
    head = list(islice(chunks, 2))  # fewer records than two chunks: not worth a process
    if sum(map(_size, head)) < 2 * CHUNK or not _can_fork():
        workers = 1
    report = DataReport(split=split)
    writer = StoreWriter(path)
    progress = tqdm(
        total=total, desc=f"tokenising {split}", unit=" records", disable=None, leave=False
    )
    try:
        for block, part in tokenised_chunks(chain(head, chunks), tokenise, workers):
            writer.add_block(block)
            report.add(part)
            progress.update(part.records)
        if not report.records:
            raise DataError("contains no records", source=source)
        if not writer.count:
            raise no_examples(report, source)
        report.examples = writer.count
        meta = {"report": report.as_dict(), "source": source, "workers": workers, **(meta or {})}
        writer.close(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    return report, workers


# -- the cache ---------------------------------------------------------------------------------
def stores_dir() -> Path:
    return cache_dir() / "data"


def open_cached(key: str, split: str) -> Built | None:
    """The complete store of ``key``, or None. A store whose files do not add up (damaged
    since) is removed, to be built again."""
    path = stores_dir() / key
    if not (path / "meta.json").exists():
        return None
    try:
        store = StoredExamples(path)
    except (ValueError, OSError, KeyError) as exc:
        import warnings

        warnings.warn(f"rebuilding the damaged data store {path}: {exc}", stacklevel=2)
        _remove(path)
        return None
    return Built(path, report_of(store.meta, split), key, cache_hit=True)


def report_of(meta: dict[str, Any], split: str) -> DataReport:
    from collections import Counter

    saved = meta["report"]
    return DataReport(
        split=split,
        records=saved["records"],
        examples=saved["examples"],
        truncated=saved["truncated"],
        skipped=Counter(saved["skipped"]),
        ignored_columns=Counter(saved["ignored_columns"]),
    )


def build_cached(
    key: str,
    chunks: Callable[[], Iterable[Chunk]],
    tokenise: RecordTokenizer,
    split: str,
    workers: int,
    source: str,
    total: int | None,
    parts: dict[str, Any],
) -> Built:
    """Build the store of ``key`` in a temporary directory and rename it into place; a store
    another process completed meanwhile is used instead."""
    import time

    root = stores_dir()
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    started = time.time()
    prefix = f"{BUILDING}{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        report, workers = write_store(
            chunks(), tokenise, tmp / "store", split, workers, source, total, {"key": parts}
        )
        try:
            os.rename(tmp / "store", root / key)
        except OSError:
            if not (root / key / "meta.json").exists():
                raise
    finally:
        _remove(tmp)
    return Built(root / key, report, key, False, time.time() - started, workers)


def build_uncached(
    chunks: Iterable[Chunk],
    tokenise: RecordTokenizer,
    split: str,
    workers: int,
    source: str,
    total: int | None,
) -> Built:
    """``--no-data-cache``: a store in a new temporary directory, removed when this process
    exits."""
    import atexit
    import time

    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="align-data-"))
    atexit.register(_remove, tmp)
    try:
        report, workers = write_store(
            chunks, tokenise, tmp / "store", split, workers, source, total
        )
    except BaseException:
        _remove(tmp)
        raise
    return Built(tmp / "store", report, None, False, time.time() - started, workers)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _remove_abandoned(root: Path) -> None:
    """Temporary directories this host's processes left when they were killed mid-build."""
    host = socket.gethostname()
    for path in root.glob(f"{BUILDING}{host}-*"):
        pid = path.name[len(f"{BUILDING}{host}-") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
