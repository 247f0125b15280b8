"""What a model knows of each held-out set: its answers' NLL and, where a reward applies, the
mean reward of its greedy answers.

The NLL is the mean over every answer token of the set (the completion of a prompt/completion
record, the last assistant turn of a ``messages`` record), in nats, from one forward pass per
batch: the number the training loss of SFT estimates. A reward applies to a set whose records
have every column it reads (``addition`` reads ``answer``); each prompt is completed greedily
(temperature 0) up to ``max_completion_length`` tokens (which a reward reading the run's
``max_completion_length``, as ``length`` does, sees as that), and the completions are written
next to the figures, so a score can be read back to the answers that earned it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.fields import column_names, validate_columns
from ..data.records import Record, read_records
from .files import write_jsonl

NLL = "nll"
BATCH = 64  # sequences per forward pass and per generate call


@dataclass(frozen=True)
class EvalSet:
    """A held-out set: ``name`` (the table's column) and its file."""

    name: str
    path: str


@dataclass(frozen=True)
class EvalSettings:
    max_length: int
    truncation: str
    max_completion_length: int
    precision: str
    trust_remote_code: bool


def reward_columns(reward: Any) -> list[str]:
    return column_names(reward.fields) if reward.fields is not None else []


def applicable(rewards: Sequence[Any], records: Sequence[Record]) -> list[Any]:
    """The rewards whose columns every record has (checked on the first; a later record without
    one is an error naming it when it is scored)."""
    first = records[0].data if records else {}
    return [c for c in rewards if all(name in first for name in reward_columns(c.reward))]


def evaluate(
    model: str | Path,
    sets: Sequence[EvalSet],
    rewards: Sequence[Any],
    settings: EvalSettings,
    config: Any,
    completions_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """``{set name: {"nll": …, reward name: mean, "examples": n, "truncated": n}}`` for the
    model (a run directory, a model or adapter directory, or a hub id) on each set."""
    import torch

    from ..tools.chat import load, resolve_source

    loaded = load(resolve_source(str(model)), settings.trust_remote_code, settings.precision)
    if config is not None:  # a reward reads the longest answer (length's L_max) from config
        config = config.model_copy(update={"max_completion_length": settings.max_completion_length})
    results: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for eval_set in sets:
            records = read_records(eval_set.path)
            out = _nll(loaded, records, eval_set, settings)
            chosen = applicable(rewards, records)
            if chosen:
                target = completions_dir / f"{eval_set.name}.jsonl" if completions_dir else None
                out.update(_rewarded(loaded, records, eval_set, chosen, settings, config, target))
            results[eval_set.name] = out
    return results


def _nll(loaded: Any, records: list[Record], eval_set: EvalSet, settings: Any) -> dict[str, Any]:
    from ..data.examples import tokenize_records
    from ..data.formats import default_batch
    from ..model.logprobs import forward_logps

    examples, report = tokenize_records(
        records,
        "prompt_completion",
        loaded.tokenizer,
        settings.max_length,
        settings.truncation,
        eval_set.name,
    )
    total, tokens = 0.0, 0
    for start in range(0, len(examples), BATCH):
        batch = default_batch(
            "prompt_completion", examples[start : start + BATCH], loaded.tokenizer.pad_token_id
        )
        batch = {k: v.to(loaded.device) if hasattr(v, "to") else v for k, v in batch.items()}
        out = forward_logps(loaded.model, batch)
        total -= float(out.sums.double().sum())
        tokens += int(out.num_tokens.sum())
    return {
        NLL: total / max(tokens, 1),
        "examples": len(examples),
        "answer_tokens": tokens,
        "truncated": report.truncated,
        "skipped": sum(report.skipped.values()),
    }


def prompt_of(record: Record) -> Any:
    """The prompt a record's answer follows: ``prompt``, or a ``messages`` list up to its last
    assistant turn."""
    data = record.data
    if "prompt" in data:
        return data["prompt"]
    messages = data.get("messages")
    last = messages[-1] if isinstance(messages, list) and len(messages) > 1 else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        return messages[:-1]
    raise record.error(
        "a rewarded evaluation completes each record's prompt: give prompt and completion "
        "columns, or messages ending in an assistant turn",
        "prompt",
    )


def _rewarded(
    loaded: Any,
    records: list[Record],
    eval_set: EvalSet,
    chosen: list[Any],
    settings: Any,
    config: Any,
    target: Path | None,
) -> dict[str, float]:
    from ..data.tokenize import TokenizeError, tokenize_prompt
    from ..rollout.rewards import RewardSet
    from ..tools.chat import Completer, sampling

    completer = Completer(
        loaded, sampling(temperature=0.0, max_completion_length=settings.max_completion_length)
    )
    reward_set = RewardSet(chosen, config, eval_set.path)
    names = reward_set.field_names()
    scores: list[list[float]] = [[] for _ in chosen]
    lines = []
    for start in range(0, len(records), BATCH):
        part = records[start : start + BATCH]
        prompts, ids, fields = [], [], {name: [] for name in names}
        for record in part:
            prompt = prompt_of(record)
            try:
                ids.append(tokenize_prompt(loaded.tokenizer, prompt, "prompt"))
            except TokenizeError as exc:
                raise record.error(str(exc), exc.field) from None
            prompts.append(prompt)
            columns: dict[str, Any] = {}  # a column two rewards read is handed over once
            for c in chosen:
                if c.reward.fields is not None:
                    columns.update(validate_columns(record, c.reward.fields))
            for name in names:
                fields[name].append(columns[name])
        done = completer.complete(ids)
        completions = [
            [{"role": "assistant", "content": d.text}] if isinstance(p, list) else d.text
            for p, d in zip(prompts, done, strict=True)
        ]
        where = [r.location for r in part]
        values = reward_set.score(prompts, completions, [d.ids for d in done], fields, where)
        for row, got in zip(scores, values, strict=True):
            row.extend(got)
        for i, (record, d) in enumerate(zip(part, done, strict=True)):
            rewards = {c.name: values[k][i] for k, c in enumerate(chosen)}
            lines.append({"record": record.location, "completion": d.text, **rewards})
    if target is not None:
        write_jsonl(target, lines)
    return {c.name: sum(row) / len(row) for c, row in zip(chosen, scores, strict=True)}


def check_set(eval_set: EvalSet) -> None:
    """A set's file exists and holds a record (its records are checked when it is read)."""
    from ..data.records import iter_records

    next(iter(iter_records(eval_set.path)))
