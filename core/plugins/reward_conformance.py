"""A conformance suite for reward plugins (``from align.testing import RewardConformance``).

A reward plugin's whole test file can be::

    from align.testing import RewardConformance

    class TestMyReward(RewardConformance):
        reward = "myreward"

The suite calls the reward as a run's rollouts do, once per call with the keyword arguments it
accepts (all of them if it takes ``**kwargs``): ``completions`` (a string each, or
``[{"role": "assistant", "content": …}]`` for a chat prompt), ``prompts`` (each completion's
prompt, as the record gives it), ``completion_ids``, ``options`` (the reward's, validated),
``config`` (the run's core options) and the record fields the reward declares, one value per
completion. It feeds it sample completions of plain and chat prompts, two per prompt, and
checks that the reward returns one value per completion; that the values are real numbers (not
booleans, strings or None); that they are finite; that the same completions under the same seed
get the same values; that scoring the completions in two calls, a half each, gives the values
one call gives (a run calls a reward once per micro-batch, whose size the batch size and the
gradient accumulation set); and that importing the plugin does not import torch.

Token ids are one per UTF-8 byte of the completion (the byte + 3), then the end-of-sequence id
2, unless the completion is cut at ``max_completion_length`` (32 by default), as a byte-level
tokenizer would give them; ``completions`` holds their decoding.

Class attributes a test may set:

- ``reward`` (required): the reward's name.
- ``plugin``: a module (or object with hookimpls) to test without installing it.
- ``options``: the reward's options, as ``--set reward.NAME.KEY=VALUE`` gives them.
- ``config``: core options of the run, as flags give them (``{"max_completion_length": 16}``).
- ``records``: the prompts, with the reward's fields: a list of dicts, as in a JSON Lines file,
  each with a ``prompt`` (a string or chat messages) and the fields the reward declares
  (validated by its ``fields`` schema, as a run's records are); two or more. Default: plain and
  chat prompts (``SAMPLE_PROMPTS``) with values the suite makes from the fields' types and
  constraints; give records when it cannot, or when the values should match the completions.
- ``completions``: completion texts; each record gets the next two, in turn. Default:
  ``SAMPLE_COMPLETIONS`` (numbers, a think/answer block, an empty completion, one longer than
  ``max_completion_length``, non-ASCII text).
"""

from __future__ import annotations

import copy
import math
import random
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from . import registry as plugin_registry
from .testing import assert_imports_without_torch, registered

SAMPLE_PROMPTS: list[Any] = [
    "What is 7 + 12?",
    [{"role": "user", "content": "What is 2 + 3?"}],
    "Name a prime number greater than 10.",
    [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What is 40 + 2?"},
    ],
]
SAMPLE_COMPLETIONS = [
    "7 + 12 = 19.",
    "The answer is 20",
    "<think>\n2 plus 3 is 5\n</think>\n<answer>\n5\n</answer>",
    "5",
    "13",
    "",
    "Forty-two, as any number of books will say: 40 + 2 = 42, and that is the answer.",
    "42 ✓ — 四十二",
]
NUM_GENERATIONS = 2  # completions per prompt, kept together in a call as a run keeps them
EOS_ID = 2
MAX_COMPLETION_LENGTH = 32

# Values the suite tries for a field without a given value, by type: the first the field's
# constraints take, starting at the record's place.
_SAMPLES: dict[type, list[Any]] = {
    float: [19.0, 5.0, 13.0, 42.0, 0.5, 1.0, 0.0, 0.25, -1.0],
    int: [19, 5, 13, 42, 1, 2, 0, 3, -1],
    str: ["19", "5", "13", "42", "a", "b"],
    bool: [True, False],
}


def _sample_values(annotation: Any, metadata: list[Any], index: int) -> Iterator[Any]:
    """Candidate values for a field of type ``annotation``, for the record at ``index``."""
    import enum
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        yield from _sample_values(args[0], [*metadata, *args[1:]], index)
    elif origin is typing.Literal:
        yield from (args[(index + i) % len(args)] for i in range(len(args)))
    elif origin in (typing.Union, types.UnionType):
        for member in args:
            if member is not type(None):
                yield from _sample_values(member, metadata, index)
    elif origin in (list, tuple, set, frozenset, typing.Sequence):
        member = args[0] if args else str
        first = list(_sample_values(member, [], index))[:1]
        second = list(_sample_values(member, [], index + 1))[:1]
        if first and second:
            yield (tuple if origin is tuple else list)(first + second)
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        members = list(annotation)
        yield from (members[(index + i) % len(members)] for i in range(len(members)))
    else:
        pool = _SAMPLES.get(annotation, [])
        yield from (pool[(index + i) % len(pool)] for i in range(len(pool)))


def _field_value(name: str, info: Any, index: int) -> tuple[bool, Any]:
    """``(True, value)``: a value for field ``name`` of the record at ``index`` that its
    type and constraints take; ``(False, None)``: none found."""
    import typing

    from pydantic import TypeAdapter, ValidationError

    annotation = info.annotation
    adapter = TypeAdapter(
        typing.Annotated[(annotation, *info.metadata)] if info.metadata else annotation
    )
    for value in _sample_values(info.annotation, list(info.metadata), index):
        try:
            adapter.validate_python(value)
        except ValidationError:
            continue
        return True, value
    return False, None


def sample_records(schema: Any, prompts: list[Any]) -> list[dict[str, Any]]:
    """A record per prompt, with a value for each field of ``schema`` that the suite can make
    (a field with a default is left out of every other record, so the default is read too).
    Raises ValueError naming a required field it cannot fill."""
    records = []
    for index, prompt in enumerate(prompts):
        record: dict[str, Any] = {"prompt": prompt}
        for name, info in schema.model_fields.items() if schema is not None else ():
            column = info.alias or name
            if not info.is_required() and index % 2:
                continue
            found, value = _field_value(name, info, index)
            if found:
                record[column] = value
            elif info.is_required():
                raise ValueError(
                    f"field {column!r} ({info.annotation}) has no default and the suite cannot "
                    "make a value for it: set records"
                )
        records.append(record)
    return records


def _ids_and_text(text: str, limit: int) -> tuple[list[int], str]:
    """A completion's token ids as a byte-level tokenizer gives them (cut at ``limit``), and
    the text they decode to."""
    data = text.encode("utf-8")
    if len(data) < limit:
        return [b + 3 for b in data] + [EOS_ID], text
    kept = data[:limit]
    return [b + 3 for b in kept], kept.decode("utf-8", errors="ignore")


def _value(value: Any) -> str:
    """A reward's value as a message shows it."""
    from ..rollout.rewards import _number

    number = _number(value)
    return _short(value, 20) if number is None else f"{number:.6g}"


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


class RewardConformance:
    """Subclass as ``TestSomething`` and set ``reward`` (and maybe ``plugin``, ``options``,
    ``config``, ``records``, ``completions``)."""

    reward: ClassVar[str] = ""
    plugin: ClassVar[Any] = None
    options: ClassVar[dict[str, Any]] = {}
    config: ClassVar[dict[str, Any]] = {}
    records: ClassVar[list[dict[str, Any]] | None] = None
    completions: ClassVar[list[str] | None] = None

    # -- fixtures --------------------------------------------------------------------------------
    @pytest.fixture
    def registry(self) -> Iterator[plugin_registry.PluginRegistry]:
        extra = [self.plugin] if self.plugin is not None else []
        with registered(*extra) as registry:
            yield registry

    @pytest.fixture
    def suite(self, registry: Any) -> SimpleNamespace:
        """The reward, its options, the run's config, and the sample rollouts to score."""
        from ..config import _validate
        from ..data.fields import validate_columns
        from ..data.records import Record
        from ..options import TrainConfig

        assert self.reward, "set reward: the name of the reward to test"
        if self.reward not in registry.rewards:
            pytest.fail(
                f"no reward {self.reward!r} is registered; registered: "
                f"{', '.join(sorted(registry.rewards)) or 'none'} (set plugin to the module "
                "that registers it, or install it)"
            )
        registered_reward = registry.rewards[self.reward]
        reward = registered_reward.item
        options = _validate(
            reward.options,
            dict(self.options),
            {k: f"options[{k!r}]" for k in self.options},
            f"options of reward {self.reward!r}: ",
        )
        given = {"rewards": [self.reward], "max_completion_length": MAX_COMPLETION_LENGTH}
        given.update(self.config)
        config = _validate(TrainConfig, given, {k: f"config[{k!r}]" for k in given})
        if self.records is not None:
            rows = list(self.records)
        else:
            try:
                rows = sample_records(reward.fields, SAMPLE_PROMPTS)
            except ValueError as exc:
                pytest.fail(f"reward {self.reward!r}: {exc}")
        assert len(rows) >= 2, "records: give two or more, so the suite can split them"
        texts = list(self.completions if self.completions is not None else SAMPLE_COMPLETIONS)
        assert texts, "completions: give one or more"
        prompts, completions, ids, labels = [], [], [], []
        fields: dict[str, list[Any]] = {}
        for index, row in enumerate(rows):
            assert isinstance(row, dict) and "prompt" in row, (
                f"records[{index}]: a record is a dict with a 'prompt' (and the reward's fields)"
            )
            values = {}
            if reward.fields is not None:
                values = validate_columns(Record(row, "records", f"[{index}]"), reward.fields)
            for g in range(NUM_GENERATIONS):
                text = texts[(index * NUM_GENERATIONS + g) % len(texts)]
                token_ids, decoded = _ids_and_text(text, config.max_completion_length)
                chat = isinstance(row["prompt"], list)
                prompts.append(row["prompt"])
                completions.append([{"role": "assistant", "content": decoded}] if chat else decoded)
                ids.append(token_ids)
                labels.append(f"records[{index}]")
                for name, value in values.items():
                    fields.setdefault(name, []).append(value)
        rollouts = SimpleNamespace(
            prompts=prompts, completions=completions, completion_ids=ids, fields=fields,
            labels=labels, groups=len(rows),
        )  # fmt: skip
        return SimpleNamespace(
            reward=reward,
            label=registered_reward.plugin.label,
            options=options,
            config=config,
            rollouts=rollouts,
        )

    # -- calling the reward ----------------------------------------------------------------------
    def _call(self, suite: SimpleNamespace, start: int = 0, stop: int | None = None) -> list[Any]:
        """The reward's values for completions ``start:stop``, called as a run calls it (a
        fresh copy of every argument: a reward that changes them changes nothing else)."""
        from ..rollout.rewards import _accepted, _values

        r = suite.rollouts
        part = slice(start, stop)
        arguments = {
            "prompts": r.prompts[part],
            "completions": r.completions[part],
            "completion_ids": r.completion_ids[part],
            "options": suite.options,
            "config": suite.config,
            **{name: values[part] for name, values in r.fields.items()},
        }
        count = len(arguments["completions"])
        function = suite.reward.function
        taken = _accepted(function, arguments)
        taken = {k: v if k in ("options", "config") else copy.deepcopy(v) for k, v in taken.items()}
        try:
            result = function(**taken)
        except Exception as exc:
            pytest.fail(
                f"reward {self.reward!r} raised {type(exc).__name__}: {exc} (called with "
                f"{', '.join(sorted(taken))} for {count} completions)"
            )
        values = _values(result)
        if values is None:
            pytest.fail(
                f"reward {self.reward!r} returned {type(result).__name__} {_short(result)} for "
                f"{count} completions: a reward returns a list of one number per completion"
            )
        return values

    def _seeded_call(
        self, suite: SimpleNamespace, start: int = 0, stop: int | None = None
    ) -> list[Any]:
        """:meth:`_call`, after seeding Python's, NumPy's and torch's generators with the
        run's seed."""
        seed = suite.config.seed
        random.seed(seed)
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed(seed)
        if "torch" in sys.modules:
            sys.modules["torch"].manual_seed(seed)
        return self._call(suite, start, stop)

    def _completion(self, suite: SimpleNamespace, i: int) -> str:
        r = suite.rollouts
        text = r.completions[i]
        text = text[0]["content"] if isinstance(text, list) else text
        kind = "chat" if isinstance(r.prompts[i], list) else "plain"
        return f"completion {i} ({r.labels[i]}, {kind} prompt, {_short(text, 30)})"

    def _one_per_completion(self, suite: SimpleNamespace, values: list[Any], count: int) -> None:
        if len(values) != count:
            pytest.fail(
                f"reward {self.reward!r} ({suite.label}) returned {len(values)} values for "
                f"{count} completions: it must return one value per completion, in their order"
            )

    @staticmethod
    def _same(a: Any, b: Any) -> bool:
        from ..rollout.rewards import _number

        x, y = _number(a), _number(b)
        if x is not None and y is not None:
            return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) or (
                math.isnan(x) and math.isnan(y)
            )
        return a is b or bool(a == b)

    # -- the checks ------------------------------------------------------------------------------
    def test_one_value_per_completion(self, suite: SimpleNamespace) -> None:
        """As many values as completions: for the whole sample, and for a single one."""
        count = len(suite.rollouts.completions)
        self._one_per_completion(suite, self._call(suite), count)
        self._one_per_completion(suite, self._call(suite, 0, 1), 1)

    def test_values_are_real_numbers(self, suite: SimpleNamespace) -> None:
        """Each value a real number as the run takes it (an int or a float, NumPy's or a
        one-value torch tensor too), not a bool, a string or None."""
        from ..rollout.rewards import _number

        values = self._call(suite)
        wrong = [
            f"{self._completion(suite, i)}: {type(v).__name__} {_short(v, 30)}"
            for i, v in enumerate(values)
            if _number(v) is None
        ]
        if wrong:
            pytest.fail(
                f"reward {self.reward!r} ({suite.label}) returned values that are not real "
                f"numbers for {len(wrong)} of {len(values)} completions: "
                + "; ".join(wrong[:6])
                + ". A reward returns an int or a float per completion: float(...) of a "
                "bool, and a number (0.0, say) for a completion it cannot score"
            )

    def test_values_are_finite(self, suite: SimpleNamespace) -> None:
        from ..rollout.rewards import _number

        values = self._call(suite)
        scored = [_number(v) for v in values]
        wrong = [
            f"{self._completion(suite, i)}: {v!r}"
            for i, v in enumerate(scored)
            if v is not None and not math.isfinite(v)
        ]
        if wrong:
            pytest.fail(
                f"reward {self.reward!r} ({suite.label}) returned values that are not finite "
                f"for {len(wrong)} of {len(values)} completions: "
                + "; ".join(wrong[:6])
                + ". A run stops at a NaN or infinite reward: return a finite number for every "
                "completion (guard divisions, logs and empty completions)"
            )

    def test_same_completions_same_seed_same_values(self, suite: SimpleNamespace) -> None:
        """Two calls on the same completions, each after seeding the generators alike, give
        the same values: a run, and a resumed run, reproduce its rewards."""
        count = len(suite.rollouts.completions)
        self._call(suite)  # a first call: whatever the reward sets up on first use
        first = self._seeded_call(suite)
        second = self._seeded_call(suite)
        if len(first) != len(second):
            pytest.fail(
                f"reward {self.reward!r} ({suite.label}) is not deterministic: the same {count} "
                f"completions got {len(first)} values, then {len(second)}"
            )
        differ = [
            f"{self._completion(suite, i)}: {_value(a)}, then {_value(b)}"
            for i, (a, b) in enumerate(zip(first, second, strict=True))
            if not self._same(a, b)
        ]
        if differ:
            pytest.fail(
                f"reward {self.reward!r} ({suite.label}) is not deterministic: the same "
                f"{count} completions, each time after seeding Python's, NumPy's and torch's "
                f"generators with {suite.config.seed}, got other values for {len(differ)}: "
                + "; ".join(differ[:6])
                + ". A reward is a function of its arguments (and the seed): does it draw from "
                "a generator of its own that nothing seeds (random.Random(), "
                "numpy.random.default_rng()), read the clock, or keep state between calls?"
            )

    def test_two_halves_score_as_one_call(self, suite: SimpleNamespace) -> None:
        """The completions scored in two calls (each prompt's completions in one of them, as
        a run's micro-batches keep them) get the values one call gives them: a run calls a
        reward once per micro-batch, and the batch size must not change a completion's
        reward."""
        r = suite.rollouts
        count = len(r.completions)
        half = (r.groups // 2) * NUM_GENERATIONS
        whole = self._seeded_call(suite)
        self._one_per_completion(suite, whole, count)
        again = self._seeded_call(suite)
        if not all(self._same(a, b) for a, b in zip(whole, again, strict=True)):
            pytest.skip(
                "the reward is not deterministic (test_same_completions_same_seed_same_values), "
                "so whether it depends on the other completions of a call cannot be told"
            )
        first = self._seeded_call(suite, 0, half)
        self._one_per_completion(suite, first, half)
        second = self._call(suite, half, None)  # the next micro-batch: no seeding between
        self._one_per_completion(suite, second, count - half)
        differ = [
            f"{self._completion(suite, i)}: {_value(a)} in one call, {_value(b)} in a "
            f"call of {half if i < half else count - half}"
            for i, (a, b) in enumerate(zip(whole, first + second, strict=True))
            if not self._same(a, b)
        ]
        if differ:
            pytest.fail(
                f"reward {self.reward!r} ({suite.label}) depends on the other completions of a "
                f"call: scored in two calls of {half} and {count - half} completions, "
                f"{len(differ)} of {count} get other values than in one call of {count}: "
                + "; ".join(differ[:6])
                + ". Is it normalised, ranked or compared over the call's completions? A run "
                "calls a reward once per micro-batch (its size set by the batch size and the "
                "gradient accumulation): score each completion on its own (a prompt's "
                "completions are always in the same call), and leave normalising to the "
                "objective (GRPO's scale_rewards)"
            )

    def test_importing_the_plugin_does_not_import_torch(self, registry: Any) -> None:
        assert_imports_without_torch(registry.rewards[self.reward].plugin, "the reward function")
