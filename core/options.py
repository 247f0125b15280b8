"""The core's run options, shared by every objective (``align run --help`` lists them)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator

from .plugins.api import Options
from .suggest import did_you_mean

# --report-to's trackers (Accelerate's), and the two words that are not one.
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


class TrainConfig(Options):
    """The core's options, shared by every objective."""

    objective: str = Field("sft", description="Objective to train with (align objectives).")
    model: str | None = Field(
        None,
        description="Hub id or local directory; none or `demo`: the demo model (`--model demo "
        "--data FILE` trains it on your data); `demo-small`: a smaller one, same tokenizer.",
    )
    data: str | list[str | dict[str, Any]] | None = Field(
        None,
        description="Training data: a file, a saved dataset, a hub dataset id (org/name), or "
        "several (repeat --data; `PATH:0.3` takes that share of a source's examples, "
        "`PATH:5000` that many); none (with no --model) or `demo`: the objective's demo data.",
    )
    eval_data: str | list[str | dict[str, Any]] | None = Field(
        None,
        description="Held-out data evaluated every eval_every steps, in --data's forms "
        "(`demo`: the demo's).",
    )
    data_split: str = Field("train", description="Split of a hub dataset given as --data.")
    eval_data_split: str = Field("test", description="Split of a hub dataset given as --eval-data.")
    data_subset: str | None = Field(
        None, description="Subset (config name) of the hub datasets given as --data/--eval-data."
    )
    data_revision: str | None = Field(
        None, description="Revision (branch, tag or commit) of the hub datasets."
    )
    data_columns: dict[str, str] | None = Field(
        None,
        description="Column mapping for data whose columns have other names: "
        "`question=prompt,answer=completion` (in run.yaml, a mapping).",
    )
    format: str | None = Field(
        None,
        description="Data format of --data and --eval-data (align formats): any format of a "
        "shape the objective trains on; default: detected from the data's columns.",
    )
    data_workers: int | None = Field(
        None, ge=1, description="Processes that tokenise the data; default: the cores available."
    )
    data_cache: bool = Field(
        True,
        description="Keep tokenised data in $ALIGN_CACHE/data, keyed by the data, tokenizer and "
        "settings, so later runs and every process map it instead of tokenising again.",
    )
    streaming: bool = Field(
        False,
        description="Train on the data as it is read, tokenised on the fly by --data-workers "
        "processes through a shuffle buffer: for data larger than memory or disk (needs "
        "--max-steps).",
    )
    shuffle_buffer: int = Field(
        1000, ge=1, description="--streaming: records the shuffle buffer holds."
    )
    output_dir: str | None = Field(
        None,
        description="Run directory: new, empty, or an align run's; default "
        "runs/<objective>-<time>.",
    )
    overwrite: bool = Field(
        False,
        description="Replace the align run in output_dir (only the files its run.json lists).",
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; wins over epochs.")
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch, per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="Decay after warm-up."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warm-up as a share of all steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases/norms).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm; 0 disables.")
    seed: int = Field(42, description="Seed for model init, shuffling and dropout.")
    max_length: int = Field(1024, ge=2, description="Longest sequence in tokens.")
    truncation: Literal["keep_start", "keep_end", "skip", "error"] = Field(
        "keep_start", description="What to do with longer sequences (every case is counted)."
    )
    precision: Literal["no", "bf16", "fp16"] = Field("no", description="Mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    disable_dropout: bool | None = Field(
        None,
        description="Set every dropout probability of the policy to 0 (LoRA's too) before "
        "training; default: the objective's (on for dpo, kto, orpo, minorsft, ift; off for sft).",
    )
    group_by_length: bool = Field(
        False,
        description="Batch training examples of similar length together (within runs of 50 "
        "batches of the shuffled order): less padding, the same examples per epoch.",
    )
    padding_free: bool = Field(
        True,
        description="Pack each micro-batch's sequences into rows without padding, a preference "
        "pair's prompt computed once (objectives that support it: sft, minorsft, dpo, kto, orpo).",
    )
    save_every: int | None = Field(
        None,
        ge=0,
        description="Checkpoint every N steps (model, optimizer, scheduler, RNG, data); 0: "
        "never. Default: every --save-minutes of training, the newest 2 kept.",
    )
    save_minutes: float = Field(
        10.0,
        gt=0,
        description="Without --save-every: checkpoint every M minutes of training, at a step "
        "boundary all processes agree on (not after the last step: final/ is written then).",
    )
    keep_last: int | None = Field(
        None,
        ge=1,
        description="Keep only the newest K checkpoints (default: 2 with checkpoints every "
        "--save-minutes; all with --save-every N).",
    )
    resume: str | None = Field(
        None,
        description="Continue an interrupted run from the newest intact checkpoint in "
        "output_dir (--resume alone; `latest` or `true` in YAML) or from a checkpoint directory.",
    )
    on_nonfinite: Literal["error", "skip"] = Field(
        "error",
        description="A NaN or infinite loss or gradient: stop the run naming the step and its "
        "examples (error), or leave the weights unchanged for that step and count it (skip).",
    )
    num_processes: int | None = Field(
        None,
        ge=1,
        description="Data-parallel processes: align starts them (torchrun) unless a launcher "
        "did; a launcher's other number is refused.",
    )
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate every N steps (and at the end)."
    )
    log_every: int = Field(1, ge=1, description="Write metrics every N steps.")
    report_to: list[str] = Field(
        "tensorboard",
        validate_default=True,
        description="Experiment trackers that get the metrics, the resolved config and the "
        "versions, comma-separated: tensorboard (logs/ in the run directory), wandb, mlflow, "
        "trackio; `all` (every one installed) or `none`.",
    )
    push_to_hub: str | None = Field(
        None,
        description="Upload final/ (the adapter for LoRA) to this hub model repository "
        "(user/name) once the run completes; created if missing.",
    )
    hub_private: bool = Field(False, description="--push-to-hub: create the repository private.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub (unsafe).")
    reference: Literal["precomputed", "model", "adapter"] = Field(
        "precomputed",
        description="Reference log-probs, for objectives that use them (dpo, kto, minorsft): "
        "precomputed once and cached, a frozen model, or the policy with its adapter disabled.",
    )
    ref_model: str | None = Field(
        None, description="Reference model (hub id or directory); default: the starting model."
    )
    teacher: str | None = Field(
        None,
        description="Teacher model (hub id or directory) for objectives that distil from one "
        "(distill): frozen, in eval mode, sharing the policy's tokenizer.",
    )
    teacher_device: str | None = Field(
        None,
        description="--teacher: the device it runs on (`cuda:1`, `cpu`); default: the policy's.",
    )
    teacher_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None,
        description="--teacher: its weights' precision (bf16 or fp16 halve its memory; no: "
        "float32); default: float32 weights under the run's --precision, as the policy.",
    )
    eval_on_start: bool = Field(
        False, description="Evaluate before the first step too (step 0), as TRL's eval_on_start."
    )
    rewards: list[str] = Field(
        default_factory=list,
        description="On-policy objectives (grpo, online-dpo, rloo; distill scores and logs them "
        "only): reward functions, NAME or NAME=WEIGHT (weight 1 by default), summed with their "
        "weights (align rewards lists them), or model:PATH[=WEIGHT] for a sequence-"
        "classification reward model's score. Repeatable flag --reward; in YAML a list or a "
        "mapping NAME: WEIGHT.",
    )
    generator: str = Field(
        "transformers",
        description="On-policy objectives: the generation backend (align plugins lists them).",
    )
    max_completion_length: int = Field(
        512, ge=1, description="On-policy objectives: the longest sampled completion in tokens."
    )
    temperature: float = Field(
        1.0, ge=0, description="On-policy objectives: sampling temperature (0: greedy)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="On-policy objectives: nucleus sampling.")
    top_k: int = Field(0, ge=0, description="On-policy objectives: top-k sampling (0: off).")
    min_p: float | None = Field(
        None, ge=0, le=1, description="On-policy objectives: min-p sampling (none: off)."
    )
    repetition_penalty: float = Field(
        1.0, gt=0, description="On-policy objectives: repetition penalty (1: none)."
    )
    verbose: bool = Field(
        False,
        description="Print the run's internal details too (how log-probs are computed, the "
        "attention kernel, cache paths); they are always in RUN_DIR/train.log.",
    )
    eval_deviation: bool = Field(
        False,
        description="Log eval_deviation, the mean per-token log-ratio to the reference (the "
        "starting model for objectives without one) on the eval split.",
    )

    @field_validator("rewards", mode="before")
    @classmethod
    def _rewards(cls, value: Any) -> Any:
        """``--reward a --reward b=0.5`` (a tuple), a YAML list, or a YAML mapping."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [name if w is None else f"{name}={w}" for name, w in value.items()]
        return list(value) if isinstance(value, tuple) else value

    @field_validator("data_columns", mode="before")
    @classmethod
    def _columns(cls, value: Any) -> Any:
        """``--data-columns question=prompt,answer=completion``, or a YAML mapping."""
        if not isinstance(value, str):
            return value
        mapping = {}
        for pair in filter(None, (part.strip() for part in value.split(","))):
            source, sep, target = (text.strip() for text in pair.partition("="))
            if not sep or not source or not target:
                raise ValueError(f"expected SOURCE=COLUMN pairs separated by commas, got {pair!r}")
            mapping[source] = target
        return mapping

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """``--report-to wandb,mlflow``, or a YAML list (or comma string)."""
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple):
            return value
        names = [str(name).strip().lower() for name in value if str(name).strip()]
        for name in names:
            if name not in (*TRACKERS, "all", "none"):
                hint = did_you_mean(name, (*TRACKERS, "all", "none"))
                raise ValueError(
                    f"unknown tracker {name!r}.{hint} Trackers: {', '.join(TRACKERS)}, all, none"
                )
        if len(names) > 1 and "none" in names:
            raise ValueError("'none' turns every tracker off: give it alone")
        return list(dict.fromkeys(names)) or ["none"]

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, value: Any) -> Any:
        """A hub repository id (``user/name``), checked before training: a typo costs a
        second, not a run."""
        if value is None:
            return value
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(value)
        except HFValidationError:
            raise ValueError(
                "not a hub repository id: expected NAME or USER/NAME (letters, digits, '-', "
                "'_' and '.'; at most 96 characters)"
            ) from None
        return value

    @field_validator("resume", mode="before")
    @classmethod
    def _yaml_true(cls, value: Any) -> Any:
        return {True: "latest", False: None}.get(value, value) if isinstance(value, bool) else value

    @field_validator("model", "ref_model", "teacher", "data", "eval_data", "output_dir")
    @classmethod
    def _expand_home(cls, value: Any) -> Any:
        if isinstance(value, list):  # a mixture: one source stays a string
            value = [cls._expand_home(v) if isinstance(v, str) else v for v in value]
            return value[0] if len(value) == 1 and isinstance(value[0], str) else value
        return os.path.expanduser(value) if value else value  # `~` the shell did not expand

    @field_validator("precision", "teacher_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false


CORE_KEYS = set(TrainConfig.model_fields)

# Options that only an on-policy objective reads: given for another, they are an error.
SAMPLING_KEYS = (
    "rewards",
    "generator",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
)
