"""TRL's and transformers' names for align's core options: the one table of them.

A TRL user types ``--learning-rate`` or writes ``per_device_train_batch_size:`` in a config; each
name with a true align counterpart is an alias of that core option (a flag of ``align run``,
``inspect`` and ``prepare``, hidden from their option list and listed in one section of their
``--help``, and a top-level key of run.yaml). Its value is converted where the meanings differ
(``bf16: true`` is ``precision: bf16``; a step or epoch count must be whole) and recorded under
align's name (run.json's config). A name with no counterpart is refused with what align does
instead, and a mistyped name is answered from this table before any edit-distance guess.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .options import CORE_KEYS

Sources = dict[str, str]  # key → where its value came from: run.yaml, --learning-rate


def _whole(what: str, instead: str) -> Callable[[Any, str], Any]:
    """A count transformers takes as a float, which align counts whole: 2.0 → 2; 2.5 refused."""

    def convert(value: Any, source: str) -> Any:
        if isinstance(value, float) and not isinstance(value, bool):
            if not value.is_integer():
                raise ConfigError(f"{source}: {value!r}: align counts whole {what}; {instead}")
            return int(value)
        return value  # an int, or what the option's own check refuses by name

    return convert


def _precision(mode: str) -> Callable[[Any, str], Any]:
    def convert(value: Any, source: str) -> Any:
        if value is True:
            return mode
        if value is False:
            return NOT_SET  # transformers' default: asks for nothing
        raise ConfigError(f"{source}: expected true or false, got {value!r}")

    return convert


def _scheduler(value: Any, source: str) -> Any:
    # align's schedules all warm up first (--warmup-steps/--warmup-ratio, 0 by default)
    return "constant" if value == "constant_with_warmup" else value


NOT_SET = object()  # a converted value that sets nothing (bf16: false)


@dataclass(frozen=True)
class Alias:
    name: str  # TRL's or transformers' name (a run.yaml key; the flag has dashes)
    key: str  # align's core option
    convert: Callable[[Any, str], Any] | None = None  # (value, source) → align's value
    shown: str = ""  # how --help shows the align side, when not just the flag

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_EPOCHS = _whole("epochs", "use --max-steps to stop within an epoch")
_STEPS = _whole(
    "steps", "transformers reads a value below 1 as a share of the run; give a number of steps"
)

ALIASES = {
    alias.name: alias
    for alias in (
        Alias("model_name_or_path", "model"),
        Alias("dataset_name", "data"),
        Alias("dataset_config", "data_subset"),
        Alias("dataset_train_split", "data_split"),
        Alias("dataset_streaming", "streaming"),
        Alias("dataset_num_proc", "data_workers"),
        Alias("learning_rate", "lr"),
        Alias("per_device_train_batch_size", "batch_size"),
        Alias("gradient_accumulation_steps", "grad_accum"),
        Alias("num_train_epochs", "epochs", _EPOCHS, "--epochs (whole epochs)"),
        Alias(
            "lr_scheduler_type",
            "lr_scheduler",
            _scheduler,
            "--lr-scheduler (linear, cosine, constant; constant_with_warmup → constant)",
        ),
        Alias("max_seq_length", "max_length"),
        Alias("truncation_mode", "truncation"),
        Alias("bf16", "precision", _precision("bf16"), "--precision bf16"),
        Alias("fp16", "precision", _precision("fp16"), "--precision fp16"),
        Alias("logging_steps", "log_every", _STEPS),
        Alias("save_steps", "save_every", _STEPS),
        Alias("save_total_limit", "keep_last"),
        Alias("eval_steps", "eval_every", _STEPS),
        Alias("resume_from_checkpoint", "resume"),
        Alias("overwrite_output_dir", "overwrite"),
        Alias("hub_model_id", "push_to_hub"),  # TRL: push_to_hub=True with hub_model_id=REPO
        Alias("hub_private_repo", "hub_private"),
    )
}

# TRL/transformers names that are align's names too.
SAME_NAMES = (
    "output_dir",
    "max_steps",
    "max_length",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "seed",
    "gradient_checkpointing",
    "padding_free",
    "disable_dropout",
    "eval_on_start",
    "trust_remote_code",
    "report_to",
)

# TRL/transformers names with no align counterpart, and what align does instead.
NO_COUNTERPART = {
    "eval_strategy": "align evaluates every --eval-every N steps and at the end, when "
    "--eval-data is given",
    "save_strategy": "align checkpoints every --save-every N steps, or by default every "
    "--save-minutes (10) minutes; --save-every 0 turns checkpoints off",
    "logging_strategy": "align logs every --log-every N steps",
    "per_device_eval_batch_size": "align evaluates in micro-batches of --batch-size",
    "dataset_test_split": "give the held-out data with --eval-data (and --eval-data-split for "
    "a hub dataset)",
    "dataset_text_field": "align reads the column `text`; --data-columns FIELD=text maps another",
    "logging_dir": "metrics go to metrics.jsonl and the trackers' logs in --output-dir",
    "optim": "align trains with AdamW (adam_beta1, adam_beta2, adam_epsilon and weight_decay "
    "in run.yaml)",
    "use_peft": "LoRA is the lora plugin's section: --lora (align plugins)",
    "lora_r": "set LoRA's rank with --lora --set lora.r=N",
    "lora_alpha": "set LoRA's alpha with --lora --set lora.alpha=X",
    "lora_dropout": "set LoRA's dropout with --lora --set lora.dropout=X",
    "lora_target_modules": "set LoRA's modules with --lora --set "
    "lora.target_modules=[q_proj,v_proj]",
    "beta": "objective options are set with --set beta=X (in run.yaml, under a section named "
    "after the objective; align objectives lists them)",
    "loss_type": "--objective picks the loss (align objectives); its options are set with "
    "--set KEY=VALUE",
    "packing": "align packs each micro-batch's sequences into rows without padding by default "
    "(--padding-free)",
}


def translate(values: dict[str, Any], sources: Sources) -> tuple[dict[str, Any], Sources]:
    """One layer of options (a file's top level, or the flags) with every alias renamed to its
    core option and its value converted; each renamed key keeps the source that names the
    alias. An option given twice in the layer (an alias and its align name, or two aliases of
    one option) is an error naming both; ``bf16: false`` and ``fp16: false`` set nothing, but
    contradict the precision they turn off."""
    out: dict[str, Any] = {}
    out_sources: Sources = {}
    turned_off: dict[str, str] = {}  # precision → the source that said false
    if values.get("push_to_hub") is True:  # TRL's form: push_to_hub: true, hub_model_id: REPO
        if "hub_model_id" not in values:
            raise ConfigError(
                f"{_label(sources['push_to_hub'], 'push_to_hub')}: align's push_to_hub takes the "
                "hub repository (push_to_hub: me/model), or give TRL's hub_model_id: me/model"
            )
        values = {key: value for key, value in values.items() if key != "push_to_hub"}
    for key, value in values.items():
        alias = ALIASES.get(key)
        source = sources[key]
        if alias is None:
            target = key
        else:
            target = alias.key
            if not source.startswith("--"):  # a file: name the key as the user wrote it
                source = f"{source}: {key}"
            if alias.convert is not None:
                converted = alias.convert(value, source)
                if converted is NOT_SET:
                    turned_off[alias.name] = source
                    continue
                value = converted
        if target in out:
            raise ConfigError(
                f"{_label(out_sources[target], target)} and {_label(source, key)} both set "
                f"option {target!r}: give one"
            )
        out[target], out_sources[target] = value, source
    for mode, source in turned_off.items():
        if out.get("precision") == mode:
            raise ConfigError(
                f"{_label(out_sources['precision'], 'precision')} and {source} (false) "
                f"contradict each other: give one"
            )
    return out, out_sources


def _label(source: str, key: str) -> str:
    """A source as the both-given error names it: the flag, or the file and the key."""
    return source if source.startswith("--") or ": " in source else f"{source}: {key}"


def suggestion(name: str, align_names: list[str], flags: bool = False) -> str:
    """What to say of an unknown option ``name`` (``learning_rat``: a run.yaml key, or a flag
    without its dashes and with underscores): what align does instead of a TRL name with no
    counterpart; else the closest of the TRL names of this table and ``align_names``, a TRL
    name winning a tie and shown with its align name. ``flags``: name them as flags. Empty when
    none is close."""

    def show(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else repr(key)

    def instead(key: str) -> str:
        return f"{show(key)} is TRL's or transformers' with no align counterpart: " + (
            f"{NO_COUNTERPART[key]}."
        )

    if name in NO_COUNTERPART:
        return f" {instead(name)}"
    candidates = [*ALIASES, *NO_COUNTERPART, *(n for n in align_names if n not in ALIASES)]
    scored = [
        (difflib.SequenceMatcher(None, name, c).ratio(), -i, c) for i, c in enumerate(candidates)
    ]
    score, _, close = max(scored, default=(0.0, 0, ""))
    if score < 0.6:
        return ""
    if close in ALIASES:
        return f" Did you mean {show(close)} (align's {show(ALIASES[close].key)})?"
    if close in NO_COUNTERPART:
        return f" Did you mean {show(close)}? {instead(close)}"
    return f" Did you mean {show(close)}?"


def help_rows(flag_keys: set[str]) -> list[tuple[str, str]]:
    """The ``--help`` section's rows: each alias flag and align's flag for it, then the names
    align shares with TRL (flags where ``flag_keys`` has them, else run.yaml keys) and those it
    has no counterpart for."""
    rows = [
        (alias.flag, alias.shown or "--" + alias.key.replace("_", "-"))
        for alias in ALIASES.values()
    ]
    same = [f"--{n.replace('_', '-')}" for n in SAME_NAMES if n in flag_keys]
    same += [f"{n} (run.yaml)" for n in SAME_NAMES if n in CORE_KEYS and n not in flag_keys]
    rows.append(("same names", ", ".join(same)))
    none = ", ".join(f"--{n.replace('_', '-')}" for n in NO_COUNTERPART)
    rows.append(("no counterpart", f"{none} (the error says what align does instead)"))
    return rows
