"""``--reference precomputed``: score every sequence once before training, cache it on disk.

A sequence is identified by the digest of its token ids and completion mask. Those already
encode everything that decides what is scored (model tokenizer, chat template, data, length
settings, truncation, KTO's mismatched partners), so a split's cache key is the reference
model's identity plus the digests of the split's sequences. The cache is a safetensors file
under ``$ALIGN_CACHE/reference/`` (default ``~/.cache/align``); a second run with the same
inputs loads it and skips the pass. Looking up a batch row hashes its unpadded tokens, so the
lookup works for any batch layout a plugin builds, as long as every sequence the loss scores is
in the examples as ``<prefix>input_ids`` with ``<prefix>completion_mask``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import cache_dir
from ..data.batching import sequence_batch, sequence_prefixes
from ..data.packing import pack, sequence_digest
from ..data.records import sampled_hash
from ..errors import PluginError
from ..model.dropout import eval_mode
from ..model.logprobs import forward_logps
from .models import Reference

FORMAT_VERSION = 2  # bump when the way log-probs are computed changes (2: every scorer probed)


class SequenceIndex:
    """Every distinct sequence of a split's examples, as arrays rather than Python objects: its
    digest (sorted, 16 bytes each), the example that first holds it, its prefix there and its
    length. Reading the examples once builds it; the scoring pass reads each example back when
    its turn comes, so a split of a million pairs costs tens of megabytes here."""

    def __init__(self, examples: Iterable[dict[str, Any]]) -> None:
        digests, owners, prefix_ids, lengths = bytearray(), array("q"), array("h"), array("q")
        prefixes: dict[str, int] = {}
        for number, example in enumerate(examples):
            for prefix in sequence_prefixes(example):
                mask = example.get(f"{prefix}completion_mask")
                if mask is None:
                    continue
                ids = example[f"{prefix}input_ids"]
                digests += sequence_digest(ids, mask)
                owners.append(number)
                prefix_ids.append(prefixes.setdefault(prefix, len(prefixes)))
                lengths.append(len(ids))
        keys = np.frombuffer(bytes(digests), dtype="V16")
        self.digests, first = np.unique(keys, return_index=True)  # each one's first holder
        self.first = first  # where each sequence first came, in the examples' order
        self.owners = np.frombuffer(owners, dtype=np.int64)[first]
        self.prefix_ids = np.frombuffer(prefix_ids, dtype=np.int16)[first]
        self.lengths = np.frombuffer(lengths, dtype=np.int64)[first]
        self.prefixes = list(prefixes)

    def __len__(self) -> int:
        return len(self.digests)

    def groups(self, packed: bool) -> tuple[list[np.ndarray], np.ndarray]:
        """The scoring units, as arrays of sequence numbers in the examples' order: each
        example's new sequences together (packed, their prompt shared), or one sequence each;
        and each unit's tokens."""
        order = np.argsort(self.first)  # as the examples hold them: example, then prefix
        if not packed:
            return [order[i : i + 1] for i in range(len(order))], self.lengths[order]
        if not len(order):
            return [], np.zeros(0, dtype=np.int64)
        owners = self.owners[order]
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        return np.split(order, starts[1:]), np.add.reduceat(self.lengths[order], starts)

    def sequences(self, unit: np.ndarray, examples: Any) -> dict[bytes, tuple[list, list]]:
        """A unit's sequences, read back from its example: digest → (ids, mask)."""
        example = examples[int(self.owners[unit[0]])]
        found = {}
        for number in unit:
            prefix = self.prefixes[self.prefix_ids[number]]
            ids, mask = example[f"{prefix}input_ids"], example[f"{prefix}completion_mask"]
            found[self.digests[number].tobytes()] = (ids, mask)
        return found


class DigestTable:
    """Reference log-probs by sequence digest in two sorted arrays (a dict of a million
    entries would hold a hundred megabytes of Python objects)."""

    def __init__(self, digests: Any = (), values: Any = ()) -> None:
        keys = np.asarray(digests, dtype=np.uint8).reshape(-1, 16).copy().view("V16").ravel()
        values = np.asarray(values, dtype=np.float64)
        self.keys, first = np.unique(keys, return_index=True)
        self.values = values[first]

    @classmethod
    def from_dict(cls, table: dict[bytes, float]) -> DigestTable:
        digests = np.frombuffer(b"".join(table), dtype=np.uint8)
        return cls(digests, list(table.values()))

    @classmethod
    def merged(cls, tables: Iterable[DigestTable]) -> DigestTable:
        tables = list(tables)
        keys = np.concatenate([t.keys for t in tables]) if tables else np.zeros(0, "V16")
        values = np.concatenate([t.values for t in tables]) if tables else np.zeros(0)
        return cls(np.frombuffer(keys.tobytes(), dtype=np.uint8), values)

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, digest: bytes, default: Any = None) -> Any:
        key = np.frombuffer(digest, dtype="V16")[0]
        at = int(np.searchsorted(self.keys, key))
        if at < len(self.keys) and self.keys[at] == key:
            return float(self.values[at])
        return default

    def digest_bytes(self) -> bytes:
        return self.keys.tobytes()


def batch_digests(batch: dict[str, torch.Tensor], prefix: str = "") -> list[bytes]:
    """The digest of each sequence of a batch: a packed batch lists them; a padded one's rows
    are hashed (padding removed through the attention mask)."""
    listed = batch.get(f"{prefix}sequence_digests")
    if listed is not None:
        return [bytes(row) for row in listed.cpu().numpy()]
    ids = batch[f"{prefix}input_ids"].cpu().numpy()
    attention = batch[f"{prefix}attention_mask"].cpu().numpy().astype(bool)
    completion = batch[f"{prefix}completion_mask"].cpu().numpy()
    return [sequence_digest(i[a], c[a]) for i, a, c in zip(ids, attention, completion, strict=True)]


class PrecomputedReference(Reference):
    """Reference log-probs looked up by sequence digest; no model is held."""

    mode = "precomputed"

    def __init__(self, table: DigestTable | dict[bytes, float]) -> None:
        self.table = DigestTable.from_dict(table) if isinstance(table, dict) else table

    def sequence_logps(
        self, batch: dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0
    ) -> torch.Tensor:
        """The sums scored before training, at temperature 1: another ``temperature`` is an
        error (only on-policy objectives score at the sampling temperature, and their
        completions cannot be precomputed: they take a model or adapter reference)."""
        if temperature not in (0, 1, None):
            raise PluginError(
                f"--reference precomputed holds log-probs at temperature 1 only, and this loss "
                f"asks for temperature {temperature}: an objective that scores at the sampling "
                "temperature is on-policy and needs --reference model or adapter"
            )
        values = []
        for digest in batch_digests(batch, prefix):
            value = self.table.get(digest)
            if value is None:
                raise PluginError(
                    "--reference precomputed has no value for a sequence of this batch "
                    f"({prefix}input_ids): the objective scores a sequence that is not in its "
                    "examples as <prefix>input_ids with <prefix>completion_mask; use "
                    "--reference model, or add the sequence to the examples in "
                    "align_prepare_dataset"
                )
            values.append(value)
        device = batch[f"{prefix}input_ids"].device
        return torch.tensor(values, dtype=torch.float32, device=device)


# -- the cache ---------------------------------------------------------------------------------
def model_identity(name_or_path: str) -> dict[str, Any]:
    """What identifies a model's weights without reading them all.

    The config's hash, any Python files shipped with the model (remote code), and for each
    weight file its content hash when it is a hub download (the blob's name), else a hash of its
    size, its header and 16 evenly spaced 64 KiB samples of its content. Copies of a file (with
    or without their modification time) share an identity; a fine-tuned file does not.
    """
    from transformers.utils import cached_file

    found = cached_file(name_or_path, "config.json")
    if found is None:
        raise OSError(f"no config.json in {name_or_path}")
    config = Path(found)
    files: dict[str, str] = {}
    for path in sorted(config.parent.iterdir()):
        if path.name.endswith((".safetensors", ".safetensors.index.json", ".py")):
            real = path.resolve()
            hub_blob = real.name != path.name and real.parent.name == "blobs"
            files[path.name] = real.name if hub_blob else sampled_hash(real)
    return {
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "files": files,
    }


def cache_key(model: dict[str, Any], digests: Iterable[bytes] | SequenceIndex) -> str:
    """The model's identity and every sequence's digest, in sorted order."""
    data = hashlib.sha256()
    data.update(json.dumps({"format": FORMAT_VERSION, "model": model}, sort_keys=True).encode())
    if isinstance(digests, SequenceIndex):
        data.update(digests.digests.tobytes())  # sorted already
    else:
        for digest in sorted(digests):
            data.update(digest)
    return data.hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_dir() / "reference" / f"{key}.safetensors"


def save_table(path: Path, table: DigestTable) -> None:
    """Write atomically: a reader never sees half a file. A failure is a warning: the values
    are in memory and the run goes on, it only loses the cache for the next run."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    digests = np.frombuffer(table.digest_bytes(), dtype=np.uint8).reshape(-1, 16)
    tensors = {
        "digests": torch.from_numpy(digests.copy()),
        "logps": torch.from_numpy(table.values.copy()),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"cannot write the reference cache {path}: {exc}", stacklevel=2)


def load_table(path: Path) -> DigestTable | None:
    """The cached table, or None when there is none or it cannot be read (then: a miss)."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        return DigestTable(tensors["digests"].numpy(), tensors["logps"].numpy())
    except Exception as exc:  # a damaged file is a miss, recomputed and rewritten
        warnings.warn(f"ignoring unreadable reference cache {path}: {exc}", stacklevel=2)
        return None


# -- the pass ----------------------------------------------------------------------------------
@dataclass
class PrecomputeReport:
    """What a split's precomputation cost, for the log and ``run.json``."""

    split: str
    sequences: int
    cache: str
    cache_hit: bool
    seconds: float
    packed: bool | None = None  # the layout it scored in; None: nothing scored (a cache hit)

    def summary(self) -> str:
        how = "loaded from cache" if self.cache_hit else f"scored in {self.seconds:.1f}s"
        return f"{self.split}: {self.sequences} sequences {how} ({self.cache})"


@torch.no_grad()
def score_sequences(
    model: Any,
    index: SequenceIndex,
    examples: Any,
    batch_size: int,
    pad_token_id: int,
    accelerator: Any,
    desc: str,
    packed: bool = True,
) -> DigestTable:
    """Reference log-probs of every sequence, shared out over processes and gathered.

    Whole groups packed with their prompts shared (``packed``), or padded rows of single
    sequences, in batches of at least ``batch_size`` sequences; longest first, so a batch too
    large for memory fails at once. Each group's sequences are read back from its example when
    its batch is built.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    units, totals = index.groups(packed)
    ordered = np.argsort(-np.asarray(totals, dtype=np.int64), kind="stable")
    mine = ordered[accelerator.process_index :: accelerator.num_processes]
    digests, values = bytearray(), []
    with (
        eval_mode(model),
        tqdm(
            total=int(sum(len(units[u]) for u in mine)),
            desc=desc,
            disable=not accelerator.is_main_process,
            leave=False,
        ) as progress,
    ):
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else 1 << 20  # unknown: assume large
        groups = (index.sequences(units[u], examples) for u in mine)
        for chunk in _batches_of_groups(groups, batch_size, vocab):
            chunk_digests = [d for group in chunk for d in group]
            if packed:
                batch = pack([list(group.values()) for group in chunk], pad_token_id)
            else:
                rows = [
                    {"input_ids": g[d][0], "completion_mask": g[d][1]} for g in chunk for d in g
                ]
                batch = sequence_batch(rows, pad_token_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():  # the precision the policy trains in
                sums = forward_logps(model, batch).sums.double().cpu().tolist()
            digests += b"".join(chunk_digests)
            values += sums
            progress.update(len(chunk_digests))
    table = DigestTable(np.frombuffer(bytes(digests), dtype=np.uint8), values)
    if accelerator.num_processes > 1:
        table = DigestTable.merged(gather_object([table]))
    return table


LOGITS_BUDGET = 1 << 26  # logits elements of one no-grad forward (256 MiB in float32)


def _batches_of_groups(groups: Iterable[dict], batch_size: int, vocab: int) -> Iterable[list[dict]]:
    """Whole groups, at least ``batch_size`` sequences a forward; up to 4× that while the
    logits stay within ``LOGITS_BUDGET`` (small models score faster in larger batches)."""
    chunk: list[dict] = []
    sequences = tokens = 0
    for group in groups:
        chunk.append(group)
        sequences += len(group)
        tokens += sum(len(ids) for ids, _ in group.values())
        if sequences >= 4 * batch_size or (
            sequences >= batch_size and tokens * vocab >= LOGITS_BUDGET
        ):
            yield chunk
            chunk, sequences, tokens = [], 0, 0
    if chunk:
        yield chunk


def precompute_split(
    scorer: Callable[[], Any],
    model_id: dict[str, Any],
    examples: Any,
    split: str,
    batch_size: int,
    pad_token_id: int,
    accelerator: Any,
) -> tuple[DigestTable, PrecomputeReport]:
    """Load the split's table from the cache, or score it and write the cache (main process).

    ``scorer()`` gives the reference model and whether it scores packed batches; it is called
    only on a cache miss. The main process decides hit or miss for every process, so they all
    take the same path.
    """
    from accelerate.utils import broadcast_object_list

    started = time.time()
    index = SequenceIndex(examples)
    path = cache_path(cache_key(model_id, index))
    shared: list[Any] = [load_table(path) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(shared)
    table, hit, packed = shared[0], shared[0] is not None, None
    if table is None:
        model, packed = scorer()
        table = score_sequences(
            model,
            index,
            examples,
            batch_size,
            pad_token_id,
            accelerator,
            f"reference ({split})",
            packed,
        )
        if accelerator.is_main_process:
            save_table(path, table)
    seconds = time.time() - started
    report = PrecomputeReport(split, len(index), str(path), hit, seconds, packed)
    return table, report
