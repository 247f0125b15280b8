"""The conformance suite for data-format plugins (``from align.testing import
FormatConformance``).

A format plugin's test file can be::

    from align.testing import FormatConformance
    import my_plugin

    class TestMyFormat(FormatConformance):
        format = "myformat"
        plugin = my_plugin

Each of the format's ``samples`` is tokenised as ``align run`` tokenises a record (the demo's
byte-level tokenizer and chat template, built offline), and the suite checks: every group is of
the shape the format declares; each sequence trains on exactly the text ``trained`` declares for
the sample (so a mask on the wrong turns, or on the prompt, fails); the sample's columns identify
the format (``detect``) when ``--format`` is not given; a sample missing one of those columns is
an ``align.DataError`` naming the line, not a traceback; the examples make the shape's padded
and packed batches; importing the plugin does not import torch.

Class attributes a test may set: ``format`` (required), ``plugin`` (a module or object with
hookimpls, tested without installing it), ``records`` and ``trained`` (instead of the format's
``samples`` and ``trained``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from ..data.batching import sequence_prefixes
from ..data.shapes import SHAPES
from ..errors import DataError
from .api import DataFormat


def trained_runs(tokenizer: Any, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each run of consecutive trained tokens of a sequence (special tokens
    left out, surrounding whitespace stripped): one run per answer, or per assistant turn."""
    runs: list[list[int]] = []
    previous = 0
    for token, trained in zip(ids, mask, strict=True):
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(token)
        previous = trained
    texts = [tokenizer.decode(run, skip_special_tokens=True).strip() for run in runs]
    return [text for text in texts if text]


def marked_text(tokenizer: Any, ids: list[int], mask: list[int]) -> str:
    """A sequence as ``align inspect`` shows it, in one line: trained runs in ``[[…]]``."""
    text, previous = "", 0
    for token, trained in zip(ids, mask, strict=True):
        if trained != previous:
            text += "[[" if trained else "]]"
        text += tokenizer.decode([token])
        previous = trained
    return text + ("]]" if previous else "")


class FormatConformance:
    """Subclass as ``TestSomething`` and set ``format`` (and maybe ``plugin``)."""

    format: ClassVar[str]
    plugin: ClassVar[Any] = None
    records: ClassVar[list[dict[str, Any]] | None] = None
    trained: ClassVar[list[Any] | None] = None

    @pytest.fixture(scope="class")
    @classmethod
    def registry(cls) -> Iterator[Any]:
        from .testing import registered

        extra = [cls.plugin] if cls.plugin is not None else []
        with registered(*extra) as registry:
            yield registry

    @pytest.fixture(scope="class")
    @classmethod
    def fmt(cls, registry: Any) -> DataFormat:
        if cls.format not in registry.formats:
            problems = [e for p in registry.plugins.values() for e in p.errors]
            raise AssertionError(
                f"data format {cls.format!r} is not registered; formats: "
                f"{', '.join(sorted(registry.formats))}; plugin errors: {problems or 'none'}"
            )
        return registry.formats[cls.format].item

    @pytest.fixture(scope="class")
    @classmethod
    def tokenizer(cls) -> Any:
        from .. import demo

        return demo.build_tokenizer()

    def _samples(self, fmt: DataFormat) -> tuple[list[dict[str, Any]], list[Any]]:
        records = list(self.records if self.records is not None else fmt.samples)
        trained = list(self.trained if self.trained is not None else fmt.trained)
        assert records, (
            f"data format {fmt.name!r} has no samples: give DataFormat(samples=…) a few records "
            "(or set records on the test class)"
        )
        assert len(trained) == len(records), (
            f"data format {fmt.name!r}: {len(records)} samples but {len(trained)} trained "
            "entries; give DataFormat(trained=…) the text each sample's sequences train on"
        )
        return records, trained

    @staticmethod
    def _record(row: dict[str, Any], number: int) -> Any:
        from ..data.records import Record

        return Record(dict(row), "samples", f"sample {number}")

    def _examples(self, fmt: DataFormat, tokenizer: Any, row: dict[str, Any], number: int) -> list:
        from ..data.examples import DataReport, RecordTokenizer

        tokenise = RecordTokenizer(fmt, tokenizer, 1_000_000, "error")
        return tokenise.examples(self._record(row, number), DataReport(split="samples"))

    def test_groups_are_of_the_declared_shape(self, fmt: DataFormat) -> None:
        from ..data.examples import RecordTokenizer

        records, _ = self._samples(fmt)
        shape = SHAPES.get(fmt.shape)
        what = f" ({shape.description})" if shape is not None else ""
        check = RecordTokenizer(fmt, None, 1_000_000, "error")  # as a run checks each record
        for number, row in enumerate(records, start=1):
            try:
                check.groups(self._record(row, number))
            except DataError as error:
                raise AssertionError(
                    f"sample {number}: format {fmt.name!r} declares shape {fmt.shape!r}{what}, "
                    f"and the core refuses its groups: {error}"
                ) from None

    def test_each_sequence_trains_on_the_declared_text(
        self, fmt: DataFormat, tokenizer: Any
    ) -> None:
        records, trained = self._samples(fmt)
        for number, (row, declared) in enumerate(zip(records, trained, strict=True), start=1):
            sequences = []
            for example in self._examples(fmt, tokenizer, row, number):
                for prefix in sequence_prefixes(example):
                    mask = example.get(f"{prefix}completion_mask")
                    if mask is not None:  # a prompt to sample from trains nothing
                        sequences.append((prefix, example[f"{prefix}input_ids"], mask))
            expected = [[piece] if isinstance(piece, str) else list(piece) for piece in declared]
            assert len(sequences) == len(expected), (
                f"sample {number}: the format gives {len(sequences)} trained sequences "
                f"({', '.join(repr(p.rstrip('_') or 'sequence') for p, _, _ in sequences)}), "
                f"trained declares {len(expected)}"
            )
            for (prefix, ids, mask), pieces in zip(sequences, expected, strict=True):
                got = trained_runs(tokenizer, ids, mask)
                want = [piece.strip() for piece in pieces]
                assert got == want, (
                    f"sample {number}, sequence {prefix.rstrip('_') or 'sequence'!r}: the core "
                    f"trains on {got}, the format declares {want}. The sequence, trained text "
                    f"in [[…]]: {marked_text(tokenizer, ids, mask)!r}"
                )

    def test_the_samples_columns_identify_the_format(self, fmt: DataFormat) -> None:
        records, _ = self._samples(fmt)
        assert fmt.detect, (
            f"data format {fmt.name!r} declares no identifying columns (detect=…): runs "
            "without --format never pick it"
        )
        for number, row in enumerate(records, start=1):
            assert fmt.detected_by(row) is not None, (
                f"sample {number} has columns {sorted(row)}, none of the format's identifying "
                f"sets {[list(need) for need in fmt.detect]}: a run without --format would not "
                "pick the format for it"
            )

    def test_a_sample_missing_an_identifying_column_is_a_data_error(
        self, fmt: DataFormat, tokenizer: Any
    ) -> None:
        records, _ = self._samples(fmt)
        for number, row in enumerate(records, start=1):
            need = fmt.detected_by(row) or ()
            for column in need:
                partial = {k: v for k, v in row.items() if k != column}
                try:
                    self._examples(fmt, tokenizer, partial, number)
                except DataError as error:
                    assert f"sample {number}" in str(error), str(error)
                    continue
                except Exception as error:  # noqa: BLE001 (the failure this test reports)
                    raise AssertionError(
                        f"sample {number} without column {column!r}: {type(error).__name__}: "
                        f"{error}; a format names the missing field with record.error(…, "
                        "field) (an align.DataError), which names the file and line"
                    ) from error
                if fmt.detected_by(partial) is None:
                    raise AssertionError(
                        f"sample {number} without its column {column!r} was read without an "
                        "error: a required column missing must be an align.DataError"
                    )

    def test_importing_the_plugin_does_not_import_torch(self, registry: Any) -> None:
        from .testing import assert_imports_without_torch

        info = registry.formats[self.format].plugin
        if info.name == "align-core":
            pytest.skip("a core format")
        assert_imports_without_torch(info, "the functions that need it")

    def test_the_examples_make_the_shapes_batches(self, fmt: DataFormat, tokenizer: Any) -> None:
        from ..data.formats import default_batch

        if fmt.shape == "prompt_only":
            pytest.skip("prompts are batched as rollouts, once completions are sampled")
        records, _ = self._samples(fmt)
        examples = [
            example
            for number, row in enumerate(records, start=1)
            for example in self._examples(fmt, tokenizer, row, number)
        ]
        pad = tokenizer.pad_token_id
        padded = default_batch(fmt, examples, pad)
        packed = default_batch(fmt, examples, pad, packed=True)
        for batch in (padded, packed):
            assert batch, f"format {fmt.name!r}: an empty batch"
        if fmt.shape in ("preference", "ranked", "feedback"):
            key = {"preference": "input_ids", "ranked": "scores", "feedback": "labels"}[fmt.shape]
            assert key in padded, f"format {fmt.name!r}: the {fmt.shape} batch has no {key!r}"
