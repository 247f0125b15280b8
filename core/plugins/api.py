"""What a plugin registers, and what its loss returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

DATA_FORMATS = {
    "prompt_completion": "prompt/completion, messages (chat), or text records",
    "preference": "prompt/chosen/rejected records (strings or message lists)",
    "feedback": "prompt/completion/label records (label a JSON boolean, true = desirable); "
    "prompt/chosen/rejected records are split into a desirable and an undesirable example",
}


class Options(BaseModel):
    """Base class for option schemas: unknown keys are errors, values are validated.

    An option whose name is a Python keyword takes an alias: ``lambda_: float =
    Field(0.2, alias="lambda")`` is set by users as ``lambda``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def option_keys(schema: type[BaseModel]) -> dict[str, str]:
    """The key users write for each option (its alias, if any) → the field's name."""
    return {field.alias or name: name for name, field in schema.model_fields.items()}


class NoOptions(Options):
    """An objective or section without options."""


@dataclass(frozen=True)
class Objective:
    """A training objective, registered by a plugin through ``align_register_objectives``.

    ``data_format`` is one of ``DATA_FORMATS``: the core reads and tokenises records of that
    format. ``needs_reference`` asks the core for reference log-probs in the loss hook.
    ``derived_metrics`` maps the reduced metric means to further metrics that are not a single
    ``Σsum/Σcount`` (a difference of two class means, say); it is called at every log and eval.
    ``packable`` says the loss reads the core's batches only through ``align.forward_logps``
    (per-sequence ``sums`` and ``num_tokens``; per-token values with their ``targets``) and the
    reference, so the core may hand it padding-free batches (``align.packing``) when the run
    has ``padding_free`` on; the conformance suite checks that the loss is unchanged by it.
    ``disable_dropout`` is the default of the run option of that name: set every dropout
    probability of the policy to 0 before training. Declare it for an objective that compares
    the policy with a reference or runs a second pass over the same inputs (as TRL does for
    DPO, KTO and ORPO); users may still override it.
    """

    name: str
    description: str
    data_format: str = "prompt_completion"
    options: type[Options] = NoOptions
    needs_reference: bool = False
    derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
    packable: bool = False
    disable_dropout: bool = False

    def __post_init__(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise ValueError(
                f"objective {self.name!r}: unknown data_format {self.data_format!r}; "
                f"expected one of {sorted(DATA_FORMATS)}"
            )
        if not (isinstance(self.options, type) and issubclass(self.options, BaseModel)):
            raise TypeError(f"objective {self.name!r}: options must be a pydantic model class")


@dataclass(frozen=True)
class Section:
    """A config section owned by a model-preparation plugin (``lora:`` → ``--set lora.r=32``).

    ``flags`` maps command-line flags to options of the section: ``{"lora": "enabled"}`` makes
    ``align run --lora`` set ``lora.enabled=true`` (a boolean option is a switch, any other takes
    a value). ``load_kwargs(options, device)`` returns extra ``from_pretrained`` arguments for
    loading the policy (a quantisation config, say), or an empty dict.
    """

    name: str
    description: str
    options: type[Options] = NoOptions
    flags: dict[str, str] = field(default_factory=dict)
    load_kwargs: Callable[[Any, Any], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        keys = option_keys(self.options)
        for flag, key in self.flags.items():
            if key not in keys:
                raise ValueError(
                    f"section {self.name!r}: flag --{flag} names no option {key!r}; "
                    f"options: {', '.join(sorted(keys))}"
                )


@dataclass(frozen=True)
class Preset:
    """A named shortcut to an objective registered elsewhere, with defaults the user can still
    override: ``Preset("lora-sft", "…", objective="sft", sections={"lora": {"enabled": True}})``
    makes ``--objective lora-sft`` train ``sft`` with LoRA on. Registered like an objective."""

    name: str
    description: str
    objective: str
    options: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LossOutput:
    """What ``align_compute_loss`` returns for one micro-batch.

    ``loss``: the differentiable *sum* of per-unit losses. ``count``: the number of units
    (completion tokens for a token mean, sequences, pairs). ``metrics``: ``name -> (sum, count)``.
    """

    loss: Any
    count: Any
    metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict)
