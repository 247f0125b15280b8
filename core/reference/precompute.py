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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def example_groups(examples: Iterable[dict[str, Any]]) -> list[dict[bytes, tuple[list, list]]]:
    """Each example's sequences (by digest) as one group, which a packed pass scores with their
    shared prompt computed once; a sequence already in an earlier group is left out."""
    seen: set[bytes] = set()
    groups = []
    for example in examples:
        group: dict[bytes, tuple[list, list]] = {}
        for prefix in sequence_prefixes(example):
            ids, mask = example[f"{prefix}input_ids"], example.get(f"{prefix}completion_mask")
            if mask is None:
                continue
            digest = sequence_digest(ids, mask)
            if digest not in seen:
                seen.add(digest)
                group[digest] = (ids, mask)
        if group:
            groups.append(group)
    return groups


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

    def __init__(self, table: dict[bytes, float]) -> None:
        self.table = table

    def sequence_logps(self, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
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


def cache_key(model: dict[str, Any], digests: Iterable[bytes]) -> str:
    data = hashlib.sha256()
    data.update(json.dumps({"format": FORMAT_VERSION, "model": model}, sort_keys=True).encode())
    for digest in sorted(digests):
        data.update(digest)
    return data.hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_dir() / "reference" / f"{key}.safetensors"


def save_table(path: Path, table: dict[bytes, float]) -> None:
    """Write atomically: a reader never sees half a file. A failure is a warning: the values
    are in memory and the run goes on, it only loses the cache for the next run."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    digests = sorted(table)
    tensors = {
        "digests": torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).view(-1, 16),
        "logps": torch.tensor([table[d] for d in digests], dtype=torch.float64),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"cannot write the reference cache {path}: {exc}", stacklevel=2)


def load_table(path: Path) -> dict[bytes, float] | None:
    """The cached table, or None when there is none or it cannot be read (then: a miss)."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        digests = tensors["digests"].numpy()
        return {bytes(d): v for d, v in zip(digests, tensors["logps"].tolist(), strict=True)}
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
    groups: list[dict[bytes, tuple[list, list]]],
    batch_size: int,
    pad_token_id: int,
    accelerator: Any,
    desc: str,
    packed: bool = True,
) -> dict[bytes, float]:
    """Reference log-probs of every sequence, shared out over processes and gathered.

    Whole groups packed with their prompts shared (``packed``), or padded rows of single
    sequences, in batches of at least ``batch_size`` sequences.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    if not packed:
        groups = [{d: s} for group in groups for d, s in group.items()]
    ordered = sorted(groups, key=lambda g: -sum(len(ids) for ids, _ in g.values()))  # OOM early
    mine = ordered[accelerator.process_index :: accelerator.num_processes]
    table: dict[bytes, float] = {}
    with (
        eval_mode(model),
        tqdm(
            total=sum(map(len, mine)),
            desc=desc,
            disable=not accelerator.is_main_process,
            leave=False,
        ) as progress,
    ):
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else 1 << 20  # unknown: assume large
        for chunk in _batches_of_groups(mine, batch_size, vocab):
            digests = [d for group in chunk for d in group]
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
            table.update(zip(digests, sums, strict=True))
            progress.update(len(digests))
    if accelerator.num_processes > 1:
        merged: dict[bytes, float] = {}
        for part in gather_object([table]):
            merged.update(part)
        table = merged
    return table


LOGITS_BUDGET = 1 << 26  # logits elements of one no-grad forward (256 MiB in float32)


def _batches_of_groups(groups: list[dict], batch_size: int, vocab: int) -> Iterable[list[dict]]:
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
    examples: list[dict[str, Any]],
    split: str,
    batch_size: int,
    pad_token_id: int,
    accelerator: Any,
) -> tuple[dict[bytes, float], PrecomputeReport]:
    """Load the split's table from the cache, or score it and write the cache (main process).

    ``scorer()`` gives the reference model and whether it scores packed batches; it is called
    only on a cache miss. The main process decides hit or miss for every process, so they all
    take the same path.
    """
    from accelerate.utils import broadcast_object_list

    started = time.time()
    groups = example_groups(examples)
    sequences = {d: s for group in groups for d, s in group.items()}
    path = cache_path(cache_key(model_id, sequences))
    shared: list[Any] = [load_table(path) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(shared)
    table, hit, packed = shared[0], shared[0] is not None, None
    if table is None:
        model, packed = scorer()
        table = score_sequences(
            model, groups, batch_size, pad_token_id, accelerator, f"reference ({split})", packed
        )
        if accelerator.is_main_process:
            save_table(path, table)
    seconds = time.time() - started
    report = PrecomputeReport(split, len(sequences), str(path), hit, seconds, packed)
    return table, report
