"""A conformance suite for objective plugins, and helpers for testing plugins in-process.

A plugin's whole test file can be::

    from align.testing import ObjectiveConformance

    class TestMyLoss(ObjectiveConformance):
        objective = "myloss"

The suite builds a tiny Llama and tokenizer offline, writes a few records of the objective's
data format to a file, tokenises them as ``align run`` does, and checks: batch keys, shapes and
loss masks; the objective's extra fields reach the batch with the values in the file; a finite
loss whose gradient reaches the trainable parameters; that the counts the loss returns are those
``align_loss_counts`` gives before the forward; that splitting the batch into micro-batches of
uneven size leaves the step's loss and gradient unchanged (a loss that returns a mean where a
sum is due fails here); that extra padding leaves the loss unchanged; that metrics are scalar
``(sum, count)`` pairs; that a ``packable`` objective's loss, metrics and gradients are the same
on padding-free batches; that importing the plugin module does not import torch; a two-step
``align run`` that saves a model ``from_pretrained`` loads again; and that a run stopped and
continued with ``--resume`` equals one that was not stopped.

An objective whose ``model_class`` is ``sequence_classification`` gets that tiny model loaded as
a one-label sequence classifier (a reward model), as ``align run`` loads it.

A failure says what differs, with numbers: each loss term's sums and counts in the two cases
compared and the batches' layouts (sequences, rows); for micro-batches, whether the counts add
up, whether the values are the means of each call's units (a loss that returns a mean), or
else each example's loss alone in a micro-batch and in the whole batch, marking those that
depend on the rest of their micro-batch (one baseline for the micro-batch instead of one per
group); for packed batches, whether the examples' own losses add up to the padded or the packed
sum, and whether a count follows the batch's rows.

An on-policy objective (``Objective(sampling=…)``) is checked on rollout batches: the suite
samples completions from the tiny model (each prompt's seeded by the prompt alone, so a prompt
gets the same completions in any micro-batch or layout), scores them with a reward of its own
(``conformance``: the share of even token ids in a completion, which differs between
completions) and lets ``align_prepare_rollouts`` see every micro-batch of the step at once.
One with a reference is also checked at step 0, where the policy is the reference, sampling at
temperature 0.7: the KL the loss reports (a ``kl`` or ``…/kl`` metric) is 0 within 1e-6, and
the policy (``align.forward_logps``) and the reference are scored at one temperature.

Class attributes a test may set:

- ``objective`` (required): the objective's name.
- ``plugin``: a module (or object with hookimpls) to test without installing it.
- ``options``: the objective's options, as ``--set`` would give them (``{"beta": 0.5}``).
- ``max_length``: the runs' ``--max-length`` (default 64, the demo model's); raise it for a
  format whose prompts are long.
- ``records``: the records written to the data file (a list of dicts, as in a JSON Lines
  file); default: the data format's ``samples``. Give them when the objective reads extra
  fields that have no default, or needs data the samples lack. Four or more, with at least two
  different prompts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pluggy
import pytest

from ..data.batching import sequence_prefixes
from ..data.formats import BUILTIN
from ..model import dropout
from . import registry as plugin_registry
from .api import Extreme, Generator, Reward
from .registry import PLUGINS_ENV

# The first-party formats' sample records (a registered format's are its ``samples``).
SAMPLE_RECORDS = {name: list(fmt.samples) for name, fmt in BUILTIN.items()}


@contextlib.contextmanager
def registered(*extra: Any, only: bool = False) -> Iterator[plugin_registry.PluginRegistry]:
    """Make the CLI and ``get_registry()`` see in-process plugins for the duration; with
    ``only=True`` no installed plugin loads besides them."""
    saved = plugin_registry._registry
    with pytest.MonkeyPatch.context() as patch:
        if only:
            patch.setenv(PLUGINS_ENV, "")
        registry = plugin_registry.load_plugins(extra=extra)
        plugin_registry.reset_registry(registry)
        try:
            yield registry
        finally:
            plugin_registry.reset_registry(saved)


def assert_imports_without_torch(info: Any, where: str) -> None:
    """Importing a plugin's module (``info``: its ``PluginInfo``) in a fresh interpreter leaves
    torch unimported: every align command loads every plugin, and would wait for torch."""
    obj = info.obj
    if obj is None:
        module = info.module
    else:
        module = obj.__name__ if isinstance(obj, ModuleType) else type(obj).__module__
    code = f"import sys\nimport {module}\nsys.exit(3 if 'torch' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 1, f"cannot import {module}: {result.stderr[-500:]}"
    assert result.returncode == 0, (
        f"importing {module} imports torch, which every align command then waits for: "
        f"import it inside {where}"
    )


def reset_accelerate() -> None:
    """Accelerate keeps process-wide state; give the next in-process run a clean one."""
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def unfused_flex_attention(monkeypatch: Any) -> None:
    """FlexAttention without ``torch.compile``, for a test's ``monkeypatch``: transformers
    compiles ``flex_attention`` (and its block masks for padded batches), which on the CPU is a
    long C++ build; the unfused forward applies the same block mask and ``mask_mod`` (its
    backward is CUDA-only)."""
    import transformers.integrations.flex_attention as integration
    import transformers.masking_utils as masking
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def unfused(query: Any, key: Any, value: Any, training: bool = False, **kwargs: Any) -> Any:
        return flex_attention(query, key, value, **kwargs)

    def uncompiled_block_mask(*args: Any, _compile: bool = False, **kwargs: Any) -> Any:
        return create_block_mask(*args, **kwargs)

    monkeypatch.setattr(integration, "compile_friendly_flex_attention", unfused)
    monkeypatch.setattr(masking, "create_block_mask", uncompiled_block_mask)


hookimpl = pluggy.HookimplMarker("align")  # align.hookimpl (align/__init__ imports this module)
SUITE_REWARD = "conformance"
SUITE_COMPLETION_LENGTH = 8
SUITE_TEMPERATURE = 0.7  # the on-policy KL check's sampling temperature (not 1: it must matter)


def _even_share(completion_ids: Any) -> list[float]:
    """The share of even token ids in each completion: a reward that differs between
    completions of a tiny random model (which seldom stops early), so advantages are not 0."""
    return [sum(1 for t in ids if t % 2 == 0) / len(ids) for ids in completion_ids]


class _SuiteReward:
    """The suite's reward, registered beside the plugin under test."""

    @hookimpl
    def align_register_rewards(self, register: Any) -> None:
        register(Reward(SUITE_REWARD, "share of even token ids (the conformance suite's)",
                        _even_share))  # fmt: skip


def _generate_per_prompt(request: Any) -> list[list[int]]:
    """``transformers`` sampling, one prompt at a time, seeded by the prompt's tokens: a
    prompt's completions do not depend on the micro-batch it is in."""
    import dataclasses
    import zlib

    import torch

    from ..rollout.generate import transformers_generate

    out = []
    for prompt in request.prompts:
        torch.manual_seed(zlib.crc32(bytes(str(prompt), "utf-8")))
        out += transformers_generate(dataclasses.replace(request, prompts=[prompt]))
    return out


class _OneProcess:
    """The slice of ``accelerate.Accelerator`` a loss hook may use, for one CPU process."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def unwrap_model(self, model: Any) -> Any:
        return model

    def reduce(self, tensor: Any, reduction: str = "sum") -> Any:
        return tensor

    def gather(self, tensor: Any) -> Any:
        return tensor

    gather_for_metrics = gather

    def pad_across_processes(self, tensor: Any, dim: int = 0, pad_index: int = 0) -> Any:
        return tensor

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: Any) -> None:
        loss.backward()


# -- what a message shows: numbers, counts, layouts ------------------------------------------------


def _metric_pair(name: str, value: Any) -> tuple[float, float]:
    """A metric as ``(sum, count)``; an :class:`align.Extreme` as ``(extreme, 1)`` (NaN values
    left out; ``(0, 0)`` when all are NaN)."""
    import torch

    if isinstance(value, Extreme):
        values = torch.as_tensor(value.values).detach().double().flatten()
        values = values[~values.isnan()]
        if not values.numel():
            return 0.0, 0.0
        return float(values.amin() if value.kind == "min" else values.amax()), 1.0
    if not (isinstance(value, tuple | list) and len(value) == 2):
        pytest.fail(f"metric {name!r} is {value!r}: not a (sum, count) pair or an align.Extreme")
    return float(value[0]), float(value[1])


def _n(value: float) -> str:
    """A number as a message shows it."""
    return f"{value:.6g}"


def _plus(values: list[float]) -> str:
    return " + ".join(_n(v) for v in values)


def _close(a: float, b: float, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _allclose(a: Any, b: Any, rtol: float, atol: float) -> bool:
    import torch

    return torch.allclose(a, b, rtol=rtol, atol=atol)


def _term_values(output: Any) -> dict[str, tuple[float, float]]:
    """A loss's terms as numbers: ``name -> (sum, count)``."""
    import torch

    return {
        name: (
            float(torch.as_tensor(s).detach().double().sum()),
            float(torch.as_tensor(c).detach().double().sum()),
        )
        for name, (s, c) in output.all_terms().items()
    }


def _label(example: dict[str, Any]) -> str:
    """An example as a message names it: its record's place in the data file."""
    return str(example.get("record", f"example {example.get('index')}"))


def _sizes(parts: list[Any]) -> str:
    return " and ".join(str(len(p.examples)) for p in parts)


def _rows(batch: dict[str, Any]) -> int:
    """The rows of a batch's first sequences (``<prefix>input_ids``)."""
    prefixes = sequence_prefixes(batch)
    return int(batch[f"{prefixes[0]}input_ids"].shape[0]) if prefixes else 0


def _layout(batch: dict[str, Any]) -> str:
    """A batch's layout in words: each ``<prefix>input_ids``'s sequences, rows and width."""
    from ..data.batching import sequence_token_counts
    from ..data.packing import is_packed

    parts = []
    for prefix in sequence_prefixes(batch):
        ids = batch[f"{prefix}input_ids"]
        try:
            sequences = len(sequence_token_counts(batch, prefix))
        except (KeyError, TypeError):
            sequences = int(ids.shape[0])
        kind = "packed" if is_packed(batch, prefix) else "padded"
        parts.append(
            f"{prefix}input_ids {kind}, {_count(sequences, 'sequence')} in "
            f"{_count(int(ids.shape[0]), 'row')} of {ids.shape[-1]}"
        )
    return ", ".join(parts) or "no <prefix>input_ids"


def _grad_difference(grad: Any, other: Any) -> str:
    difference = (other.double() - grad.double()).abs()
    return (
        f"max |difference| {difference.max().item():.3g}, where the gradient's largest entry "
        f"is {grad.abs().max().item():.3g}"
    )


def _temperature_spy(method: Any, name: str, calls: list[tuple[str, Any]]) -> Any:
    """``method`` (a reference's), recording ``(name, temperature)`` for every call."""
    import inspect

    signature = inspect.signature(method)

    def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            temperature = bound.arguments.get("temperature", 1.0)
        except TypeError:
            temperature = kwargs.get("temperature", 1.0)
        calls.append((name, temperature))
        return method(*args, **kwargs)

    return spy


def _mean_fit(name: str, one: Any, parts: list[Any], total: float, sums: list[float]) -> str | None:
    """The message for term ``name`` when one batch's and the micro-batches' values are
    those of a mean over each call's units (of the term, examples or rows), else None."""
    count = one.terms[name][1]
    candidates = (
        ("units", count, [p.terms[name][1] for p in parts]),
        ("examples", len(one.examples), [len(p.examples) for p in parts]),
        ("rows", _rows(one.batch), [_rows(p.batch) for p in parts]),
    )
    for unit, n, ns in candidates:
        whole, split = total * n, sum(s * k for s, k in zip(sums, ns, strict=True))
        if not _close(whole, split, rel=1e-4):
            continue
        each = " and ".join(f"{_n(s)} for {_n(k)}" for s, k in zip(sums, ns, strict=True))
        products = " + ".join(f"{_n(s)} × {_n(k)}" for s, k in zip(sums, ns, strict=True))
        return (
            f"term {name!r}: the values are the means of each call's {unit}: one batch "
            f"returns {_n(total)} for {_n(n)} {unit}, the micro-batches {each}; as means they "
            f"agree ({_n(total)} × {_n(n)} = {_n(whole)}, {products} = {_n(split)}), as sums "
            f"they do not ({_n(total)} ≠ {_plus(sums)} = {_n(sum(sums))}). Does the loss hook "
            "return a mean where the sum of its units is due? The core divides each term's sum "
            "by its count over the whole step."
        )
    return None


def _explain_grouping(name: str, one: Any, parts: list[Any], per_example: list[Any]) -> str:
    """The message for term ``name`` when the micro-batches' sums do not add up to one
    batch's: each example's value alone and in the whole batch."""
    total, count = one.terms[name]
    sums = [p.terms[name][0] for p in parts]
    counts = [p.terms[name][1] for p in parts]
    products = " + ".join(f"{_n(s)} × {_n(k)}" for s, k in zip(sums, counts, strict=True))
    lines = [
        f"term {name!r}: one batch sums to {_n(total)} over {_n(count)} units, the "
        f"micro-batches to {_plus(sums)} = {_n(sum(sums))} over {_plus(counts)} units; nor "
        f"are they means ({_n(total)} × {_n(count)} = {_n(total * count)}, {products} = "
        f"{_n(sum(s * k for s, k in zip(sums, counts, strict=True)))}). Each example's sum "
        "alone in a micro-batch, and in the whole batch (its sum less the other examples'):"
    ]
    differ = 0
    for label, alone, in_batch in per_example:
        a, b = alone.get(name, (math.nan,))[0], in_batch.get(name, math.nan)
        same = _close(a, b)
        differ += not same
        lines.append(
            f"    {label}: {_n(a)} alone, {_n(b)} in the batch{'' if same else '  <- differs'}"
        )
    if differ:
        lines.append(
            f"{differ} of {len(per_example)} examples' losses depend on the other examples of "
            "their micro-batch: is a baseline, a normalisation or a mean taken over the whole "
            "micro-batch where it belongs to each example's own group (a prompt's completions, "
            "a pair)? The core splits a step into micro-batches as memory allows."
        )
    else:
        lines.append(
            "Each example's loss is the same alone as in the batch, yet they do not add up to "
            "the batch's: does the loss add a term of the whole micro-batch?"
        )
    return "\n".join(lines)


def _load_policy(path: Any, model_class: str, tokenizer: Any) -> Any:
    """The policy as a run loads it: a causal LM, or a one-label sequence classifier (a reward
    model) that knows the tokenizer's pad token."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if model_class == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _suite_teacher(objective: Any, model_dir: Path) -> Path | None:
    """For an objective that distils (``needs_teacher``): a teacher beside the suite's model,
    the demo architecture at another width and depth (so it differs from the student), written
    once; else None."""
    if not getattr(objective, "needs_teacher", False):
        return None
    from .. import demo

    path = model_dir.with_name(f"{model_dir.name}-teacher")
    if not (path / "config.json").is_file():
        demo.build_demo_model(path, hidden_size=64, layers=2)
    return path


class ObjectiveConformance:
    """Subclass as ``TestSomething`` and set ``objective`` (and maybe ``plugin``, ``options``)."""

    objective: ClassVar[str] = ""
    plugin: ClassVar[Any] = None
    options: ClassVar[dict[str, Any]] = {}
    records: ClassVar[list[dict[str, Any]] | None] = None
    max_length: ClassVar[int] = 64

    # -- fixtures --------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory: Any) -> Path:
        from .. import demo

        path = tmp_path_factory.mktemp("conformance-model")
        demo.build_demo_model(path)
        return path

    @pytest.fixture
    def registry(self) -> Iterator[plugin_registry.PluginRegistry]:
        extra = [self.plugin] if self.plugin is not None else []
        with registered(*extra, _SuiteReward()) as registry:
            yield registry

    @pytest.fixture
    def setup(self, registry: Any, model_dir: Path, tmp_path: Path) -> SimpleNamespace:
        """Spec, tokenizer, model, reference, run and tokenised examples for the objective."""
        return self._setup(registry, model_dir, tmp_path)

    def _setup(
        self, registry: Any, model_dir: Path, tmp_path: Path, **flags: Any
    ) -> SimpleNamespace:
        """The ``setup`` fixture's objects, with core options ``flags`` added to the run's."""
        import torch
        from transformers import AutoTokenizer

        from ..config import resolve
        from ..loop.data import build_examples, data_sources
        from ..reference import ModelReference
        from ..run import Run
        from .hooks import ObjectiveHooks

        data_format = registry.data_format(registry.objective(self.objective).item)
        rows = self.records if self.records is not None else list(data_format.samples)
        assert rows, f"data format {data_format.name!r} has no samples: set records"
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        sets = [f"{key}={json.dumps(value)}" for key, value in self.options.items()]
        given = {
            "objective": self.objective,
            "max_steps": 2,
            "model": str(model_dir),
            "data": str(path),
            "max_length": self.max_length,
            "batch_size": 2,
            "output_dir": str(tmp_path / "run"),
            **flags,
        }
        on_policy = registry.objective(self.objective).item.on_policy
        if on_policy:
            given.update(rewards=[SUITE_REWARD], max_completion_length=SUITE_COMPLETION_LENGTH)
        teacher_dir = _suite_teacher(registry.objective(self.objective).item, model_dir)
        if teacher_dir is not None:
            given["teacher"] = str(teacher_dir)
        spec = resolve(registry, None, given, sets)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hooks = ObjectiveHooks(registry, spec, tokenizer)
        # Through the memory-mapped store a run reads: examples are read-only views, so a hook
        # that changes them in place instead of returning new ones fails here as in a run.
        sources = data_sources(spec.config)
        examples, _, _ = build_examples(hooks, spec.config, sources["train"], "train")
        torch.manual_seed(0)
        model = _load_policy(model_dir, spec.objective.item.model_class, tokenizer)
        model = registry.chain_hook(
            "align_prepare_model",
            "model",
            model,
            tokenizer=tokenizer,
            config=spec.config,
            sections=spec.sections,
        ).train()
        dropout.resolve(spec)  # as align run does: the objective's default
        if spec.config.disable_dropout:
            dropout.disable_dropout(model)
        reference = (
            ModelReference.frozen_copy(model)
            if spec.objective.item.uses_reference(spec.options)
            else None
        )
        run = Run(spec.config, _OneProcess(), tokenizer, tmp_path, max_steps=2)
        if teacher_dir is not None:
            from ..reference.teacher import Teacher

            teacher = _load_policy(teacher_dir, "causal_lm", tokenizer)
            hooks.teacher = Teacher(teacher, str(teacher_dir), torch.device("cpu"))
        engine = None
        if on_policy:
            from ..rollout.engine import RolloutEngine

            engine = RolloutEngine(spec, registry, hooks, tokenizer, model)
            engine.generator = plugin_registry.Registered(
                Generator("conformance", "seeded by the prompt", _generate_per_prompt),
                registry.rewards[SUITE_REWARD].plugin,
            )
        return SimpleNamespace(
            spec=spec, hooks=hooks, tokenizer=tokenizer, examples=examples, model=model,
            reference=reference, run=run, data=path, model_dir=model_dir, records=rows,
            engine=engine,
        )  # fmt: skip

    def _batches(
        self, setup: SimpleNamespace, parts: list[list[dict[str, Any]]], packed: Any = None
    ) -> list[dict[str, Any]]:
        """The batches of the step's micro-batches of examples, as the run builds them: the
        core's (or the plugin's) batches, or, for an on-policy objective, a round of rollouts
        that ``align_prepare_rollouts`` saw whole. ``packed``: the layout (default: the
        run's)."""
        if setup.engine is None:
            return [setup.hooks.build_batch(part, packed=packed) for part in parts]
        from ..loop.metrics import MetricSums

        saved = setup.hooks.packed
        setup.hooks.packed = saved if packed is None else packed
        try:
            return setup.engine.round(
                setup.model, parts, 0, "train", setup.run.accelerator, setup.reference,
                setup.run, MetricSums(),
            )  # fmt: skip
        finally:
            setup.hooks.packed = saved

    def _batch(self, setup: SimpleNamespace, examples: Any, packed: Any = None) -> dict[str, Any]:
        return self._batches(setup, [examples], packed)[0]

    # -- the checks ------------------------------------------------------------------------------
    def test_batch_keys_shapes_and_loss_masks(self, setup: SimpleNamespace) -> None:
        import torch

        batch = self._batch(setup, setup.examples, packed=False)
        prefixes = sequence_prefixes(batch)
        assert prefixes, "a batch needs at least one <prefix>input_ids tensor"
        rows = {batch[f"{p}input_ids"].shape[0] for p in prefixes} | {len(setup.examples)}
        for prefix in prefixes:
            ids = batch[f"{prefix}input_ids"]
            for name in ("attention_mask", "completion_mask"):
                key = f"{prefix}{name}"
                assert key in batch, f"{prefix}input_ids needs {key}"
                assert batch[key].shape == ids.shape, f"{key} is not shaped like its input_ids"
            trained = batch[f"{prefix}completion_mask"].bool()
            assert not (trained & ~batch[f"{prefix}attention_mask"].bool()).any(), (
                f"{prefix}completion_mask trains padding"
            )
            assert trained[:, 1:].any(-1).all(), f"a {prefix}input_ids row has nothing to train"
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and not key.endswith(("input_ids", "mask")):
                assert value.shape[0] in rows, f"{key}: first dimension is not the batch's"

    def test_extra_fields_reach_the_batch_from_the_data_file(self, setup: SimpleNamespace) -> None:
        """Every field the objective declares is in the batch, one value per example, equal to
        the file's value (or the field's default), in both layouts."""
        import torch

        from ..data.fields import column_names, validate_columns
        from ..data.records import Record

        schema = setup.spec.objective.item.fields
        if schema is None:
            pytest.skip("the objective declares no extra fields")
        by_location = {e["record"]: e for e in setup.examples}
        for packed in self._layouts(setup):
            batch = self._batch(setup, setup.examples, packed=packed)
            for name in column_names(schema):
                assert name in batch, f"field {name!r} is not in the batch"
                values = batch[name]
                values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
                assert len(values) == len(setup.examples), f"{name}: not one value per example"
                for example, value in zip(setup.examples, values, strict=True):
                    line = int(example["record"].split()[-1])
                    row = Record(setup.records[line - 1], str(setup.data), f"line {line}")
                    want = validate_columns(row, schema)[name]  # as pydantic reads the file
                    same = (
                        value == pytest.approx(want) if isinstance(want, float) else value == want
                    )
                    assert same, f"{name} of {example['record']}: {value!r}, expected {want!r}"
                    assert by_location[example["record"]][name] == want

    @staticmethod
    def _layouts(setup: SimpleNamespace) -> tuple[bool, ...]:
        """Padded, and packed too for a ``packable`` objective."""
        return (False, True) if setup.spec.objective.item.packable else (False,)

    def _loss(self, setup: SimpleNamespace, batch: dict[str, Any]) -> Any:
        from .api import LossOutput

        output, extra = setup.hooks.compute(setup.model, batch, setup.reference, setup.run)
        assert isinstance(output, LossOutput)
        return output, extra

    @staticmethod
    def _total(output: Any) -> Any:
        """A micro-batch's loss as one large batch of it would have it: Σ_terms sum / count."""
        import torch

        return sum(
            torch.as_tensor(s) / torch.as_tensor(c).sum().clamp(min=1)
            for s, c in output.all_terms().values()
        )

    def test_loss_is_finite_and_reaches_the_parameters(self, setup: SimpleNamespace) -> None:
        import torch

        output, _ = self._loss(setup, self._batch(setup, setup.examples))
        for name, (loss, count) in output.all_terms().items():
            loss, count = torch.as_tensor(loss), torch.as_tensor(count)
            assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: {loss} is not a finite scalar"
            assert count.sum() >= 0, f"{name}: count must be a number of loss units"
        self._total(output).backward()
        grads = [p.grad for p in setup.model.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reached the model"

    def test_counts_before_the_forward_match_the_loss(self, setup: SimpleNamespace) -> None:
        """``align_loss_counts`` (or the default, one ``loss`` term counting examples) gives,
        from the batch alone, the counts the loss then returns, in both layouts."""
        import torch

        for packed in self._layouts(setup):
            batch = self._batch(setup, setup.examples, packed=packed)
            counts = setup.hooks.counts(batch, setup.examples)
            with torch.no_grad():
                output, _ = self._loss(setup, batch)
            terms = output.all_terms()
            assert sorted(counts) == sorted(terms), (
                f"align_loss_counts gives the terms {sorted(counts)}, the loss {sorted(terms)}"
            )
            for name, (_, count) in terms.items():
                given = float(torch.as_tensor(counts[name]).sum())
                assert float(torch.as_tensor(count).sum()) == given, (
                    f"term {name!r}: the loss counts {float(torch.as_tensor(count).sum())}, "
                    f"align_loss_counts {given}"
                )

    def _step(self, setup: SimpleNamespace, split: list[list[dict[str, Any]]]) -> SimpleNamespace:
        """One optimizer step's accumulation over the micro-batches ``split``: the step's loss,
        the gradients, and each micro-batch's terms (``name -> (sum, count)``)."""
        import torch

        from ..loop.metrics import MetricSums
        from ..loop.step import accumulate_gradients

        setup.model.zero_grad(set_to_none=True)
        batches = self._batches(setup, split)
        micro = [
            (batch, setup.hooks.counts(batch, part))
            for batch, part in zip(batches, split, strict=True)
        ]
        returned: list[dict[str, tuple[float, float]]] = []

        def compute(batch: dict[str, Any]) -> Any:
            output, extra = self._loss(setup, batch)
            returned.append(_term_values(output))
            return output, extra

        torch.manual_seed(0)
        loss = accumulate_gradients(
            setup.model, micro, compute, setup.run.accelerator, MetricSums()
        )
        grads = {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.grad is not None}
        parts = [
            SimpleNamespace(examples=part, batch=batch, terms=terms)
            for part, (batch, _), terms in zip(split, micro, returned, strict=True)
        ]
        return SimpleNamespace(loss=loss, grads=grads, parts=parts)

    def _terms_of(
        self, setup: SimpleNamespace, split: list[list[dict[str, Any]]], packed: Any = None
    ) -> list[dict[str, tuple[float, float]]]:
        """Each micro-batch's terms, ``name -> (sum, count)``, without gradients."""
        import torch

        out = []
        for batch in self._batches(setup, split, packed):
            torch.manual_seed(0)
            with torch.no_grad():
                output, _ = self._loss(setup, batch)
            out.append(_term_values(output))
        return out

    def test_micro_batches_equal_one_batch(self, setup: SimpleNamespace) -> None:
        """A step over uneven micro-batches (1 example, then the rest) has the loss and the
        gradient of the step over one batch of all the examples: the loss hook returns sums
        and the core divides. A loss that returns a mean, counts that do not add up, or an
        example's loss that depends on the rest of its micro-batch (one baseline for the
        micro-batch where each group needs its own) fail here; the message shows each term's
        sums and counts, and which examples' losses change."""
        assert len(setup.examples) >= 3, "the suite needs at least 3 examples: set records"
        whole = self._step(setup, [setup.examples])
        split = self._step(setup, [setup.examples[:1], setup.examples[1:]])
        if split.loss != pytest.approx(whole.loss, rel=1e-5, abs=1e-6):
            pytest.fail(self._explain_split(setup, whole, split))
        only = sorted(whole.grads.keys() ^ split.grads.keys())
        assert not only, (
            f"the step over micro-batches and over one batch give gradients to different "
            f"parameters: {only[:5]} (a part of the loss detached in one and not the other?)"
        )
        for name, grad in whole.grads.items():
            other = split.grads[name]
            if not _allclose(other, grad, rtol=1e-4, atol=1e-6):
                pytest.fail(
                    f"the step's loss is the same over micro-batches of "
                    f"{_sizes(split.parts)} examples and over one batch ({_n(whole.loss)}), but "
                    f"the gradient of {name} is not: {_grad_difference(grad, other)}. Is a part "
                    "of the loss detached, or scaled by the micro-batch, in one and not the other?"
                )

    def _explain_split(
        self, setup: SimpleNamespace, whole: SimpleNamespace, split: SimpleNamespace
    ) -> str:
        """Why the step over micro-batches differs from one batch, term by term, with numbers:
        counts that do not add up, the totals of a mean, or examples whose loss depends on
        the other examples of their micro-batch."""
        (one,) = whole.parts
        lines = [
            f"micro-batches of {_sizes(split.parts)} examples give the step a loss of "
            f"{_n(split.loss)}, one batch of all {len(one.examples)} {_n(whole.loss)} "
            f"({_layout(one.batch)})."
        ]
        names = sorted(one.terms)
        for part in split.parts:
            if sorted(part.terms) != names:
                return (
                    f"{lines[0]} The loss of one batch has the terms {names}, that of a "
                    f"micro-batch of {len(part.examples)} examples {sorted(part.terms)}."
                )
        per_example: list[Any] | None = None
        for name in names:
            total, count = one.terms[name]
            sums = [p.terms[name][0] for p in split.parts]
            counts = [p.terms[name][1] for p in split.parts]
            if not _close(count, sum(counts), rel=1e-6):
                lines.append(self._explain_counts(name, one, split.parts, count, counts))
                continue
            if _close(total, sum(sums)):
                lines.append(
                    f"term {name!r} agrees: sum {_n(total)} = {_plus(sums)} over {_n(count)} units."
                )
                continue
            mean = _mean_fit(name, one, split.parts, total, sums)
            if mean is not None:
                lines.append(mean)
                continue
            if per_example is None:
                per_example = self._per_example(setup, whole)
            lines.append(_explain_grouping(name, one, split.parts, per_example))
        return "\n".join(lines)

    @staticmethod
    def _explain_counts(
        name: str, one: Any, parts: list[Any], count: float, counts: list[float]
    ) -> str:
        text = (
            f"term {name!r}: its counts do not add up: {_n(count)} units in the whole batch, "
            f"{_plus(counts)} = {_n(sum(counts))} in the micro-batches of {_sizes(parts)} "
            "examples; a term's count is the number of its units (examples, pairs, tokens), "
            "which add up however the examples are split."
        )
        rows = [_rows(one.batch), *(_rows(p.batch) for p in parts)]
        if [count, *counts] == rows and rows[0] != len(one.examples):
            text += (
                f" These are the batches' rows ({_layout(one.batch)}; "
                + "; ".join(_layout(p.batch) for p in parts)
                + "): a packed row holds several sequences, so count the sequences "
                "(len(align.sequence_token_counts(batch))) or their tokens, not the rows."
            )
        return text

    def _per_example(self, setup: SimpleNamespace, whole: SimpleNamespace) -> list[Any]:
        """For each example of the step, its terms alone in a micro-batch of its own, and
        in the whole batch (the whole batch's sum less that of the other examples, all in the
        same step)."""
        (one,) = whole.parts
        out = []
        for i, example in enumerate(setup.examples):
            others = [e for j, e in enumerate(setup.examples) if j != i]
            alone, rest = self._terms_of(setup, [[example], others])
            in_batch = {k: one.terms[k][0] - rest[k][0] for k in one.terms if k in rest}
            out.append((_label(example), alone, in_batch))
        return out

    def test_extra_padding_leaves_the_loss_unchanged(self, setup: SimpleNamespace) -> None:
        import torch

        batch = self._batch(setup, setup.examples, packed=False)
        padded = dict(batch)
        for prefix in sequence_prefixes(batch):
            for name, fill in (
                ("input_ids", setup.tokenizer.pad_token_id),
                ("attention_mask", 0),
                ("completion_mask", 0),
            ):
                key = f"{prefix}{name}"
                extra = torch.full((batch[key].shape[0], 5), fill, dtype=batch[key].dtype)
                padded[key] = torch.cat([batch[key], extra], dim=1)
        with torch.no_grad():
            plain, _ = self._loss(setup, batch)
            more, _ = self._loss(setup, padded)
        before, after = _term_values(plain), _term_values(more)
        problems = []
        for name in sorted(before.keys() | after.keys()):
            if name not in before or name not in after:
                problems.append(f"term {name!r} is only in the loss of one of them")
                continue
            (s, n), (ps, pn) = before[name], after[name]
            if not _close(pn, n, rel=1e-6):
                problems.append(f"term {name!r} counts {_n(n)} units, {_n(pn)} with the padding")
            if not _close(ps, s, rel=1e-4, abs_=1e-5):
                problems.append(f"term {name!r} sums to {_n(s)}, {_n(ps)} with the padding")
        total, padded_total = float(self._total(plain)), float(self._total(more))
        if problems or padded_total != pytest.approx(total, rel=1e-4, abs=1e-5):
            pytest.fail(
                f"5 more padding positions at the end of every row ({_layout(batch)}) change "
                f"the loss from {_n(total)} to {_n(padded_total)}: "
                + "; ".join(problems or ["the terms agree, the total does not"])
                + ". The loss reads padding: take only positions where completion_mask (or "
                "attention_mask) is 1, as align.forward_logps does, and count only them."
            )

    def test_packed_batches_give_the_padded_loss(self, setup: SimpleNamespace) -> None:
        """A ``packable`` objective: the same loss, counts, metrics and gradients from the core's
        padding-free batches as from padded ones; the message compares the two layouts."""
        import torch

        if not setup.spec.objective.item.packable:
            pytest.skip("the objective is not packable")
        results = []
        for packed in (False, True):
            setup.model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            batch = self._batch(setup, setup.examples, packed)
            output, extra = self._loss(setup, batch)
            self._total(output).backward()
            grads = {
                n: p.grad.clone() for n, p in setup.model.named_parameters() if p.grad is not None
            }
            everything = {**output.metrics, **extra}
            metrics = {k: _metric_pair(k, v) for k, v in everything.items()}
            results.append((_term_values(output), metrics, grads, _layout(batch), _rows(batch)))
        (terms, metrics, grads, layout, rows), (p_terms, p_metrics, p_grads, p_layout, p_rows) = (
            results
        )
        where = f"(padded: {layout}; packed: {p_layout})"
        assert p_terms.keys() == terms.keys(), (
            f"the loss has the terms {sorted(terms)} padded, {sorted(p_terms)} packed {where}"
        )
        problems = []
        for name, (total, n) in terms.items():
            p_total, p_n = p_terms[name]
            if p_n != n:
                problem = f"term {name!r} counts {_n(n)} units padded, {_n(p_n)} packed"
                if (n, p_n) == (rows, p_rows) and rows != p_rows:
                    problem += (
                        " — the number of rows of each batch: a packed row holds several "
                        "sequences, so count the sequences (len(align.sequence_token_counts("
                        "batch))) or their tokens, not the rows"
                    )
                problems.append(problem)
            if p_total != pytest.approx(total, rel=1e-5, abs=1e-5):
                problems.append(
                    f"term {name!r} sums to {_n(total)} padded, {_n(p_total)} packed"
                    + self._explain_packed_sum(setup, name, total, p_total)
                )
        if problems:
            pytest.fail(
                f"packed batches give another loss than padded ones {where}: " + "; ".join(problems)
            )
        assert p_metrics.keys() == metrics.keys(), (
            f"the metrics are {sorted(metrics)} padded, {sorted(p_metrics)} packed {where}"
        )
        for name, (total, n) in metrics.items():
            assert p_metrics[name] == pytest.approx((total, n), rel=1e-5, abs=1e-5), (
                f"metric {name!r} is (sum {_n(total)}, count {_n(n)}) padded, (sum "
                f"{_n(p_metrics[name][0])}, count {_n(p_metrics[name][1])}) packed {where}"
            )
        only = sorted(grads.keys() ^ p_grads.keys())
        assert not only, f"only one layout gives a gradient to {only[:5]} {where}"
        for name, grad in grads.items():
            assert _allclose(p_grads[name], grad, rtol=1e-4, atol=1e-5), (
                f"the loss agrees, but the gradient of {name} does not "
                f"{where}: {_grad_difference(grad, p_grads[name])}"
            )

    def _explain_packed_sum(
        self, setup: SimpleNamespace, name: str, total: float, p_total: float
    ) -> str:
        """Whether the examples' own losses (each alone in a batch) add up to the padded or
        the packed sum, and which examples differ between the layouts on their own."""
        alone = [
            (_label(e), *(self._terms_of(setup, [[e]], packed)[0].get(name, (math.nan,))[0]
                          for packed in (False, True)))
            for e in setup.examples
        ]  # fmt: skip
        padded_sum = sum(a for _, a, _ in alone)
        text = f"; the examples alone sum to {_n(padded_sum)}"
        if _close(padded_sum, total, rel=1e-5, abs_=1e-5) and not _close(
            padded_sum, p_total, rel=1e-5, abs_=1e-5
        ):
            text += (
                " as padded, not as packed: the packed loss is not the sum of its sequences' "
                "— does it reduce over a row (a packed row holds several sequences, "
                "align.forward_logps's logps are per row) where it should reduce per sequence "
                "(align.forward_logps's sums and num_tokens, one per sequence)?"
            )
        differ = [
            f"{label} {_n(a)} padded, {_n(b)} packed"
            for label, a, b in alone
            if not _close(a, b, rel=1e-5, abs_=1e-5)
        ]
        if differ:
            text += "; alone in a batch, " + ", ".join(differ[:8])
        return text

    def test_kl_to_the_reference_is_0_at_step_0(
        self, registry: Any, model_dir: Path, tmp_path: Path, monkeypatch: Any
    ) -> None:
        """An on-policy objective with a reference scores it as it scores the policy: at step
        0, where the policy is the reference, the run sampling at temperature 0.7, the KL the
        loss reports (a ``kl`` or ``…/kl`` metric) is 0, and the policy (``align.forward_logps``)
        and the reference (``reference.sequence_logps``, ``token_logps``) are scored at the
        same temperature: ``run.config.temperature``, the sampling distribution (TRL's GRPO),
        or both at 1 (TRL's online DPO)."""
        import importlib

        import torch

        from .api import Preset

        item = registry.objective(self.objective).item
        if isinstance(item, Preset):
            item = registry.objective(item.objective).item
        if not item.on_policy:
            pytest.skip("the objective is not on-policy: it samples at no temperature")
        setup = self._setup(registry, model_dir, tmp_path, temperature=SUITE_TEMPERATURE)
        if setup.reference is None:
            pytest.skip("the objective uses no reference with these options")
        policy: list[tuple[str, Any]] = []
        reference: list[tuple[str, Any]] = []
        package = importlib.import_module(__name__.split(".")[0])  # align
        spied = _temperature_spy(package.forward_logps, "align.forward_logps", policy)
        monkeypatch.setattr(package, "forward_logps", spied)
        for name in ("sequence_logps", "token_logps"):
            method = getattr(setup.reference, name)
            spied = _temperature_spy(method, f"reference.{name}", reference)
            monkeypatch.setattr(setup.reference, name, spied)
        batch = self._batch(setup, setup.examples)
        torch.manual_seed(0)
        with torch.no_grad():
            output, extra = self._loss(setup, batch)
        problems = []
        for name, value in {**output.metrics, **extra}.items():
            if name == "kl" or name.endswith("/kl"):
                total, count = _metric_pair(name, value)
                value = total / count if count else total
                if abs(value) > 1e-6:
                    problems.append(
                        f"metric {name!r} is {value:.3g} (sum {_n(total)} over {_n(count)})"
                    )
        at: dict[float, set[str]] = {}  # temperature -> what was scored at it
        for name, t in policy + reference:
            at.setdefault(1.0 if t == 0 else float(t), set()).add(name)  # 0: greedy, as 1
        if policy and reference and len(at) > 1:
            problems.append(
                "the policy and the reference are scored at different temperatures: "
                + ", ".join(f"{t} ({', '.join(sorted(names))})" for t, names in sorted(at.items()))
            )
        if problems:
            pytest.fail(
                f"at step 0, where the policy is the reference and the run samples at "
                f"temperature {SUITE_TEMPERATURE}: " + "; ".join(problems) + ". Score the "
                "policy and the reference alike: both at run.config.temperature, the "
                "distribution the completions were sampled from (align.forward_logps(model, "
                "batch, temperature=…), reference.sequence_logps(batch, temperature=…)), as "
                "TRL's GRPO does, or both at 1, as its online DPO does; the KL to the reference "
                "is then 0 at step 0."
            )

    def test_metrics_are_scalar_sum_count_pairs(self, setup: SimpleNamespace) -> None:
        import torch

        output, extra = self._loss(setup, self._batch(setup, setup.examples))
        for name, pair in {**output.metrics, **extra}.items():
            if isinstance(pair, Extreme):
                assert torch.as_tensor(pair.values).dim() <= 1, f"{name}: values not 1-D"
                continue
            assert isinstance(pair, tuple | list) and len(pair) == 2, f"{name}: not (sum, count)"
            for part in pair:
                assert torch.as_tensor(part).numel() == 1, f"{name}: not a scalar"

    def test_importing_the_plugin_does_not_import_torch(self, registry: Any) -> None:
        assert_imports_without_torch(registry.objective(self.objective).plugin, "its hooks")

    def _align_run(self, setup: SimpleNamespace, out: Path, *extra: str) -> str:
        """``align run`` of this objective on the sample data, in-process; its output."""
        from click.testing import CliRunner

        from ..cli import cli

        args = ["run", "--objective", self.objective, "--model", str(setup.model_dir)]
        args += ["--data", str(setup.data), "--batch-size", "2"]
        args += ["--output-dir", str(out), "--max-length", str(self.max_length), *extra]
        teacher_dir = _suite_teacher(setup.spec.objective.item, setup.model_dir)
        if teacher_dir is not None:
            args += ["--teacher", str(teacher_dir)]
        if setup.engine is not None:
            args += ["--reward", SUITE_REWARD]
            args += ["--max-completion-length", str(SUITE_COMPLETION_LENGTH)]
        for key, value in self.options.items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        reset_accelerate()
        try:
            result = CliRunner().invoke(cli, args)
        finally:
            reset_accelerate()
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result.output

    def test_a_two_step_run_saves_a_model_that_loads(
        self, setup: SimpleNamespace, tmp_path: Path, monkeypatch: Any
    ) -> None:
        monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))  # not the user's cache
        out = tmp_path / "run"
        self._align_run(setup, out, "--max-steps", "2")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2]
        model_class = setup.spec.objective.item.model_class
        loaded = _load_policy(out / "final", model_class, setup.tokenizer)
        if model_class == "sequence_classification":  # its pad token, saved: no help needed
            assert loaded.config.pad_token_id == setup.tokenizer.pad_token_id

    def test_a_resumed_run_equals_an_uninterrupted_one(
        self, setup: SimpleNamespace, tmp_path: Path, monkeypatch: Any
    ) -> None:
        """Stopped after step 2 of 5 (2 steps an epoch), ``--resume`` continues it to the same
        losses and weights: the loss keeps no state of its own across steps."""
        import shutil

        import torch
        from safetensors.torch import load_file

        monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # GPU kernels need not be deterministic
        steps = ["--max-steps", "5", "--save-every", "2", "--lr", "1e-2"]
        whole, stopped = tmp_path / "whole", tmp_path / "stopped"
        self._align_run(setup, whole, *steps)
        shutil.copytree(whole, stopped)  # what a run killed during step 3 leaves
        shutil.rmtree(stopped / "final")
        shutil.rmtree(stopped / "checkpoints" / "step-4")
        rows = (stopped / "metrics.jsonl").read_text().splitlines()
        kept = [r for r in rows if json.loads(r)["step"] <= 2]
        (stopped / "metrics.jsonl").write_text("".join(r + "\n" for r in kept))
        info = json.loads((stopped / "run.json").read_text())
        (stopped / "run.json").write_text(json.dumps({**info, "status": "running"}))
        output = self._align_run(setup, stopped, *steps, "--resume")
        assert "Resuming at step 2 of 5" in output
        expected = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
        got = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
        assert [r.keys() for r in got] == [r.keys() for r in expected]
        for row, want in zip(got, expected, strict=True):
            assert row == pytest.approx(want, abs=1e-6, rel=0), want["step"]
        name = next(p.name for p in (whole / "final").glob("*.safetensors"))
        a, b = load_file(str(whole / "final" / name)), load_file(str(stopped / "final" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
