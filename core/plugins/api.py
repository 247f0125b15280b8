"""What a plugin registers (objectives, data formats, sections, presets), the schemas it
declares (options, extra record fields) and what its loss returns."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError


def type_members(annotation: Any, metadata: list[Any]) -> list[tuple[Any, list[Any]]]:
    """A type's members, each with its metadata: a union's, each ``Annotated`` unwrapped (its
    metadata, a ``Field(...)``'s included, added to the member's). :class:`align.Options`
    reads it too, to tell a number field."""
    out: list[tuple[Any, list[Any]]] = []
    stack = [(annotation, metadata)]
    while stack:
        member, meta = stack.pop()
        origin = typing.get_origin(member)
        if origin is typing.Annotated:
            inner, *extra = typing.get_args(member)
            flat = []
            for item in extra:
                flat += [item, *item.metadata] if isinstance(item, FieldInfo) else [item]
            stack.append((inner, [*meta, *flat]))
        elif origin in (typing.Union, types.UnionType):
            stack += [(m, meta) for m in reversed(typing.get_args(member))]
        else:
            out.append((member, meta))
    return out


def _number_kind(annotation: Any) -> str | None:
    """What a field of this type expects when it takes numbers but not booleans: ``"an
    integer"`` (``int``, ``int | None``), ``"a number"`` (any ``float``), else None (a
    ``bool``, ``bool | int``, ``Any``, a string, a list: not a number field)."""
    leaves = {member for member, _ in type_members(annotation, [])}
    if bool in leaves or Any in leaves:
        return None
    if float in leaves:
        return "a number"
    return "an integer" if int in leaves else None


class _NumberRules(BaseModel):
    """What :class:`Options` and :class:`Fields` share: a number is finite and is not a boolean.

    Pydantic reads ``.nan`` and ``inf`` as floats and, in its lax mode, ``true`` as 1: a NaN
    learning rate or weight would pass the checks and fail steps later, far from the value.
    Strings still parse as before (``--set beta=1e-3``, which YAML reads as a string). A refused
    boolean's message shows the value itself (``ctx["got"]``), so error reports need not.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _boolean_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse ``true``/``false`` for an ``int`` or ``float`` field (a ``bool`` one, or a
        union with ``bool``, keeps them); every other value goes on to pydantic's checks."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            expected = _number_kind(cls.model_fields[info.field_name].annotation)
            if expected is not None:
                raise PydanticCustomError(
                    "int_type" if expected == "an integer" else "float_type",
                    "expected {expected}, got a boolean ({got})",
                    {"expected": expected, "got": str(value).lower()},
                )
        return value


class Options(_NumberRules):
    """Base class for option schemas: unknown keys are errors, values are validated.

    Every number is finite (NaN and infinities are refused) and a boolean is not a number
    (``true`` for an ``int`` or ``float`` option is refused, not read as 1); a plugin's options
    get these rules by subclassing this class.

    An option whose name is a Python keyword takes an alias: ``lambda_: float =
    Field(0.2, alias="lambda")`` is set by users as ``lambda``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def option_keys(schema: type[BaseModel]) -> dict[str, str]:
    """The key users write for each option (its alias, if any) → the field's name."""
    return {field.alias or name: name for name, field in schema.model_fields.items()}


class NoOptions(Options):
    """An objective or section without options."""


class Fields(_NumberRules):
    """Base class for the extra record fields an objective reads (``Objective(fields=…)``).

    Each field is a column of the data file: ``weight: float = 1.0`` reads ``"weight": 0.3``
    from every record, validated as options are (a bad value, a NaN or a boolean where a number
    belongs included, is an error that names the file, the line and the field), and hands it to
    the loss as ``batch["weight"]``, one value per example. A field without a default is
    required. Values are strict in JSON, JSON Lines, Parquet and ``datasets`` records: a number
    field (``int``/``float``, in a list or a nested object too) refuses a boolean (``true`` is
    not 1) and a string (``"0.3"`` is not 0.3); CSV cells, all text, are converted. NaN and
    ±infinity are refused unless the field allows them: ``Field(1.0, allow_inf_nan=True)``, or
    ``list[Annotated[float, Field(allow_inf_nan=True)]]`` for a list's items. A field with its
    own ``mode="before"`` validator gets the value as the file has it. An absent column, and an
    empty CSV cell, are missing (the default applies, else "missing field"). JSON ``null``: a
    field whose type admits None (``float | None``) gets None; a field with a default takes its
    default (Arrow-backed datasets read a key a record lacks as null); a required field is an
    error, ``is null``.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass
class Group:
    """A record as the core tokenises it: one prompt and the answers that follow it.

    ``prompt``: a string, a list of chat messages, or None (then each answer is a whole
    text, trained throughout, or a whole conversation, trained on its assistant turns).
    ``answers``: sequence prefix → answer (a string, or messages when the prompt is messages);
    the core tokenises ``prompt + answer`` into ``<prefix>input_ids`` and
    ``<prefix>completion_mask`` (1 on the answer's tokens), truncates all of a group's answers
    alike, and scores them with the reference (the precomputed pass computes their shared prompt
    once). A format's ``batch`` may pack them the same way (``preference`` and ``ranked`` do:
    ``align.packing.pack``); the default batch packs each prefix on its own. Use ``""`` for a
    single sequence, ``"chosen_"``/``"rejected_"`` for a pair, ``"completion0_"``… for a list.
    ``values``: per-example values the format's batch hands the loss (a label, scores).
    ``fields``: prefix → the record field each answer came from, named in errors
    (default: the prefix without its ``_``, or ``completion`` for ``""``).
    """

    prompt: str | list[dict[str, Any]] | None
    answers: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def field_of(self, prefix: str) -> str:
        return self.fields.get(prefix) or prefix.rstrip("_") or "completion"


@dataclass(frozen=True)
class DataFormat:
    """A data format, registered through ``align_register_formats``: the record columns it
    reads, how a record becomes one or more :class:`Group`, and the shape of those groups.

    ``groups(record)`` gets an ``align.Record`` (``record.data``: the row; ``record.error(message,
    field)``: a DataError naming file, line and field) and returns a Group, or a list of them
    (one example each). ``shape`` says what the groups are: one of the core's shapes
    (``conversation``, ``prompt_completion``, ``preference``, ``feedback``, ``prompt_only``,
    ``ranked``; ``align formats`` lists them), and the format then feeds every objective that
    trains on that shape, its groups checked against it and batched as the shape is; or a name
    of the plugin's own, which its objectives name and its ``batch`` builds.
    ``schema`` (a pydantic model, like :class:`Fields`) validates the columns before ``groups``
    sees them, with the strict values of :class:`Fields` (a plain pydantic model too: NaN and
    infinity refused unless allowed), and ``record.data`` then holds the validated values,
    keyed by each field's alias (the column's name in the data); without it, list the columns
    in ``columns`` and check them in ``groups``. Columns that neither the format nor the
    objective's fields read are reported (``ignored columns``).
    ``detect``: the column sets that identify the format's records, any one of which, all
    present in a file, makes the format a candidate when a run gives no ``--format`` (default:
    the schema's required fields, else every column in ``columns``).
    ``batch(examples, pad_token_id, packed)`` builds the batch of a shape of the plugin's own
    (None: every sequence under its own prefix, ``align.default_batch``); ``packed`` asks for
    the padding-free layout (``align.packing``). A format of a core shape has the shape's batch.
    ``samples``: a few records, which the conformance suites and ``align new-plugin`` use;
    ``trained``: for each sample, the text each of its sequences trains on (a list of strings
    per example, in the order of its answers), which ``align.testing.FormatConformance``
    compares with what the core masks.
    """

    name: str
    description: str
    groups: Callable[[Any], Group | list[Group]]
    shape: str
    columns: tuple[str, ...] = ()
    schema: type[BaseModel] | None = None
    batch: Callable[[list[dict[str, Any]], int, bool], dict[str, Any]] | None = None
    samples: tuple[dict[str, Any], ...] = ()
    detect: tuple[tuple[str, ...], ...] = ()
    trained: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        from ..data.shapes import SHAPES

        if not (isinstance(self.shape, str) and self.shape):
            raise TypeError(f"data format {self.name!r}: shape must be a shape's name")
        if self.shape in SHAPES and self.batch is not None:
            raise TypeError(
                f"data format {self.name!r}: shape {self.shape!r} is the core's, batched as "
                "every objective of the shape expects; drop batch= (or name a shape of your own)"
            )
        if self.trained and len(self.trained) != len(self.samples):
            raise TypeError(
                f"data format {self.name!r}: trained has {len(self.trained)} entries for "
                f"{len(self.samples)} samples"
            )
        required: tuple[str, ...] = self.columns
        if self.schema is not None:
            if not (isinstance(self.schema, type) and issubclass(self.schema, BaseModel)):
                raise TypeError(f"data format {self.name!r}: schema must be a pydantic model class")
            fields = self.schema.model_fields
            names = tuple(f.alias or n for n, f in fields.items())
            object.__setattr__(self, "columns", tuple(dict.fromkeys((*self.columns, *names))))
            required = tuple(f.alias or n for n, f in fields.items() if f.is_required())
        if not self.detect:
            object.__setattr__(self, "detect", (required,) if required else ())
        object.__setattr__(self, "detect", tuple(tuple(c) for c in self.detect))

    def detected_by(self, columns: Any) -> tuple[str, ...] | None:
        """The first of ``detect``'s column sets that ``columns`` holds, or None."""
        present = set(columns)
        return next((need for need in self.detect if set(need) <= present), None)


MODEL_CLASSES = ("causal_lm", "sequence_classification")  # what an objective's policy is


@dataclass(frozen=True)
class Objective:
    """A training objective, registered by a plugin through ``align_register_objectives``.

    ``shapes`` are the data shapes the loss trains on (see :class:`DataFormat`): any format
    of one of them feeds the objective (``--format``, or detected from the data's columns), and
    the loss gets the shape's batch, whichever format the records came in. The shapes of one
    objective must share a batch layout (``conversation`` and ``prompt_completion`` do: the
    default). ``fields`` (an :class:`Fields` schema) declares
    the extra record columns the loss reads; the core validates them and adds them to every
    batch, one value per example. ``needs_reference`` asks the core for reference log-probs in
    the loss hook.
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
    ``needs_reference`` may also be a function of the options (GRPO's ``beta > 0``).
    ``sampling`` makes the objective *on-policy*: a function of its options that returns an
    :class:`Sampling`. Its shape is ``prompt_only``: groups without answers;
    for every prompt of a micro-batch the core samples ``num_generations`` completions from the
    current policy, scores them with the run's reward functions (``--reward``) and hands the
    loss a batch of rollouts (see :class:`Sampling` for its keys). An objective whose
    :class:`Sampling` has ``on_policy_share`` below 1 also trains on its data's own completions
    (shapes ``prompt_completion``/``conversation``; ``prompt_only`` data only at a share of 1).
    ``needs_teacher`` asks the core for a frozen teacher model (``--teacher PATH``), handed to
    the loss hook as ``teacher`` (an ``align.Teacher``); a run of such an objective without
    ``--teacher`` is refused, and ``--teacher`` for any other objective too.
    ``model_class`` says what the policy is: ``"causal_lm"`` (the default: loaded with
    ``AutoModelForCausalLM``, its loss reads log-probs through ``align.forward_logps``) or
    ``"sequence_classification"`` (a reward model: ``AutoModelForSequenceClassification`` with
    ``num_labels=1``, ``config.pad_token_id`` set from the tokenizer, its new ``score`` head
    initialised by transformers after the run's seed, as TRL's ``RewardTrainer`` does; the loss
    reads one score per sequence through ``align.sequence_scores``, padded or packed). Such a
    policy has no log-probs:
    no reference, no sampling, no ``--eval-deviation``; LoRA trains its head alongside the
    adapter (PEFT's ``SEQ_CLS``), and ``final/`` loads with
    ``AutoModelForSequenceClassification.from_pretrained``.
    """

    name: str
    description: str
    shapes: tuple[str, ...] = ("prompt_completion", "conversation")
    options: type[Options] = NoOptions
    needs_reference: bool | Callable[[Any], bool] = False
    derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
    packable: bool = False
    disable_dropout: bool = False
    fields: type[Fields] | None = None
    sampling: Callable[[Any], Sampling] | None = None
    model_class: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    needs_teacher: bool = False
    data_format: str | None = None  # replaced by shapes: refused with the way to write it

    def uses_reference(self, options: Any) -> bool:
        """Whether the loss gets reference log-probs with these options."""
        if callable(self.needs_reference):
            return bool(self.needs_reference(options))
        return bool(self.needs_reference)

    @property
    def on_policy(self) -> bool:
        return self.sampling is not None

    def __post_init__(self) -> None:
        from ..data.shapes import SHAPES

        if self.data_format is not None:
            shape = {"prompt_completion": '"prompt_completion", "conversation"'}.get(
                self.data_format, f'"{self.data_format}"'
            )
            raise TypeError(
                f"objective {self.name!r}: data_format= is replaced by shapes=, the shapes of "
                f"data the objective trains on, which any format of those shapes feeds: write "
                f"shapes=({shape},) (a plugin's own format: its DataFormat(shape=…))"
            )
        if isinstance(self.shapes, str):
            object.__setattr__(self, "shapes", (self.shapes,))
        if self.model_class not in MODEL_CLASSES:
            raise TypeError(
                f"objective {self.name!r}: model_class must be one of "
                f"{', '.join(MODEL_CLASSES)}, not {self.model_class!r}"
            )
        if self.model_class != "causal_lm" and (self.sampling or self.needs_reference):
            raise TypeError(
                f"objective {self.name!r}: a {self.model_class} policy has no log-probs, so it "
                "can neither sample completions nor be compared with a reference"
            )
        if not self.shapes or not all(isinstance(s, str) and s for s in self.shapes):
            raise TypeError(f"objective {self.name!r}: shapes must be shape names")
        layouts = {SHAPES[s].batch if s in SHAPES else s for s in self.shapes}
        if len(layouts) > 1:
            raise TypeError(
                f"objective {self.name!r}: shapes {', '.join(self.shapes)} are batched "
                "differently; an objective's shapes must share one batch layout"
            )
        if self.fields is not None and not (
            isinstance(self.fields, type) and issubclass(self.fields, BaseModel)
        ):
            raise TypeError(f"objective {self.name!r}: fields must be an align.Fields class")
        if not (isinstance(self.options, type) and issubclass(self.options, BaseModel)):
            raise TypeError(f"objective {self.name!r}: options must be a pydantic model class")


@dataclass(frozen=True)
class Section:
    """A config section owned by a model-preparation plugin (``lora:`` → ``--set lora.r=32``).

    ``flags`` maps command-line flags to options of the section: ``{"lora": "enabled"}`` makes
    ``align run --lora`` set ``lora.enabled=true`` (a boolean option is a switch, any other takes
    a value). ``load_kwargs(options, device)`` returns extra ``from_pretrained`` arguments for
    loading the policy (a quantisation config, say), or an empty dict. ``active(options)`` says
    whether the section is switched on (default: its options' ``enabled`` switch, if any); a run
    it is on in is named after it: ``label`` in the banner (``dpo + LoRA``; default: its name),
    its name in the default run folder (``runs/dpo-lora-<time>``).
    """

    name: str
    description: str
    options: type[Options] = NoOptions
    flags: dict[str, str] = field(default_factory=dict)
    load_kwargs: Callable[[Any, Any], dict[str, Any]] | None = None
    label: str = ""
    active: Callable[[Any], bool] | None = None

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

    One term: ``loss``, the differentiable *sum* of per-unit losses, and ``count``, the number
    of units (completion tokens for a token mean, sequences, pairs). Several terms, each
    normalised by its own unit: ``terms={"nll": (sum, tokens), "odds_ratio": (sum, pairs)}``;
    the run's loss is ``Σ_terms Σsum / Σcount``, each term totalled over the accumulated batch
    and all processes. The counts must equal those ``align_loss_counts`` gave for the batch
    (the core scales the loss by them before the backward). ``metrics``: ``name -> (sum,
    count)``, or ``name -> Extreme(values, "min")`` for a minimum or maximum.
    """

    loss: Any = None
    count: Any = None
    metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    terms: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.terms:
            if self.loss is not None or self.count is not None:
                raise TypeError("LossOutput takes loss and count, or terms, not both")
            for name, pair in self.terms.items():
                if not (isinstance(pair, tuple | list) and len(pair) == 2):
                    raise TypeError(f"LossOutput term {name!r} must be a (sum, count) pair")
        elif self.loss is None or self.count is None:
            raise TypeError("LossOutput needs loss and count (or terms={name: (sum, count)})")

    def all_terms(self) -> dict[str, tuple[Any, Any]]:
        """Every term as ``name -> (sum, count)``; a single-term loss is ``{"loss": …}``."""
        return dict(self.terms) if self.terms else {"loss": (self.loss, self.count)}


@dataclass(frozen=True)
class Extreme:
    """A metric that is a minimum or a maximum, as TRL's ``clip_ratio/low_min``: the smallest
    (``kind="min"``) or largest (``"max"``) of a micro-batch's ``values`` (one per sequence,
    say) over every process, NaN values left out, then the mean of those extremes over the
    micro-batches since the last log (a micro-batch whose values are all NaN adds none).
    Give it as a ``LossOutput`` metric's value in place of a ``(sum, count)`` pair."""

    values: Any
    kind: Literal["min", "max"]

    def __post_init__(self) -> None:
        if self.kind not in ("min", "max"):
            raise TypeError(f"Extreme kind must be 'min' or 'max', not {self.kind!r}")


@dataclass(frozen=True)
class Sampling:
    """What an on-policy objective (``Objective(sampling=…)``) asks of the core.

    ``num_generations``: completions sampled for each prompt (a group). ``reuse``: optimizer
    steps trained on one round of rollouts (GRPO's ``num_iterations``, μ): the round is sampled
    at the first of them, and each epoch counts ``reuse`` steps per micro-batch group.
    ``rewards``: whether the loss learns from rewards (GRPO, online DPO); with False (on-policy
    distillation) ``--reward`` is optional and, when given, only scored and logged.
    ``on_policy_share``: the share of rounds sampled from the policy (GKD's λ). Each round is
    on-policy or not by a draw seeded from the run's seed and the round's index (a resumed run
    draws the same); a round that is not trains on the data's own completions, as they are
    (the record's sequence, trained where the data format trains it), and a round that is
    samples after the record's prompt: all of the sequence before its last trained span (a
    conversation's turns before its last assistant turn), or a ``prompt_only`` record's prompt.
    Below 1 the data must have completions (``prompt_completion`` or ``conversation``), unless
    ``teacher_samples``: then the rounds that do not sample from the policy sample from the
    run's teacher (``Objective(needs_teacher=True)``; GKD's ``seq_kd``), after the same prompts.

    A rollout batch (what ``align_prepare_rollouts``, ``align_loss_counts`` and
    ``align_compute_loss`` get) has one sequence per completion, prompt by prompt (prompt 0's
    completions, then prompt 1's, …), in the padded layout (``input_ids``, ``attention_mask``,
    ``completion_mask`` = 1 on the completion's tokens) or the packed one (``align.packing``,
    each prompt computed once for its group), read through ``align.forward_logps``; and per
    sequence: ``group`` (long: the prompt's index in the micro-batch), ``rewards`` (float: the
    weighted sum of the reward functions), ``rewards/<name>`` (float: each function's value;
    both absent when the run has no rewards), ``truncated`` (bool: no EOS within
    ``max_completion_length``) and ``completion_lengths`` (long). ``completions`` and
    ``prompts`` hold the decoded text (or messages) per sequence, and the objective's extra
    fields are one value per prompt. A round on the data's completions
    (``on_policy_share`` < 1) hands the loss the data's own batches instead, with
    ``on_policy`` False in ``batch["on_policy"]`` (True in a rollout batch).
    """

    num_generations: int
    reuse: int = 1
    rewards: bool = True
    on_policy_share: float = 1.0
    teacher_samples: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.num_generations, int) and self.num_generations >= 1):
            raise ValueError(
                f"num_generations must be a positive integer, got {self.num_generations!r}"
            )
        if not (isinstance(self.reuse, int) and self.reuse >= 1):
            raise ValueError(f"reuse must be a positive integer, got {self.reuse!r}")
        share = self.on_policy_share
        if isinstance(share, bool) or not (isinstance(share, int | float) and 0 <= share <= 1):
            raise ValueError(f"on_policy_share must be a number in [0, 1], got {share!r}")


@dataclass(frozen=True)
class Reward:
    """A reward function, registered through ``align_register_rewards`` and chosen with
    ``--reward NAME[=WEIGHT]`` (repeatable; the rewards' weighted sum is each completion's
    reward).

    ``function`` is called once per micro-batch of rollouts with keyword arguments, those it
    accepts (all of them if it takes ``**kwargs``): ``completions`` (the decoded completions,
    a string each, or ``[{"role": "assistant", "content": …}]`` for chat prompts),
    ``prompts`` (each completion's prompt, as the record gave it), ``completion_ids`` (token
    ids), ``options`` (the reward's validated options), ``config`` (the run's core options:
    ``max_completion_length``, ``temperature``, ``seed``, …), and the record fields the reward
    declares in ``fields`` (an :class:`Fields` schema: ``answer: int``), one value per
    completion. It returns one finite number per completion (TRL's ``None`` for "cannot score"
    is not accepted): an exception, a wrong count or a value that is not a finite number (a
    boolean, a string or None included; numpy and one-value torch numbers are numbers) stops
    the run with an error that names the reward and the record. Options are set with
    ``--set reward.NAME.KEY=VALUE`` or a ``reward: {NAME: {KEY: VALUE}}`` mapping in the config
    file.
    """

    name: str
    description: str
    function: Callable[..., Any]
    fields: type[Fields] | None = None
    options: type[Options] = NoOptions

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise TypeError(f"reward {self.name!r}: function must be callable")
        if self.fields is not None and not (
            isinstance(self.fields, type) and issubclass(self.fields, BaseModel)
        ):
            raise TypeError(f"reward {self.name!r}: fields must be an align.Fields class")


@dataclass
class GenerationRequest:
    """One round of sampling, as a generation backend gets it.

    ``prompts``: token ids per prompt (unpadded); ``num_generations`` completions per prompt,
    returned prompt by prompt. ``model``: the model that samples, unwrapped, in eval mode,
    without gradients, under the run's autocast: the policy, or in a round the teacher samples
    (``Sampling(teacher_samples=True)``, GKD's ``seq_kd``) the run's teacher, whose weights are
    not the policy's (a backend that keeps its own copy of the weights must not take them).
    ``seed``: sampling must depend on nothing else (the core seeds torch's generator with it
    around the call, for backends that use it).
    """

    model: Any
    tokenizer: Any
    prompts: list[list[int]]
    num_generations: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float | None
    repetition_penalty: float
    eos_token_ids: list[int]
    pad_token_id: int
    seed: int


@dataclass(frozen=True)
class Generator:
    """A generation backend, registered through ``align_register_generators`` and chosen with
    ``--generator NAME`` (default ``transformers``: ``model.generate``).

    ``generate(request)`` returns ``len(prompts) * num_generations`` completions, each a list
    of token ids that ends at its first EOS (included) or after ``max_new_tokens`` tokens.
    """

    name: str
    description: str
    generate: Callable[[GenerationRequest], list[list[int]]]
