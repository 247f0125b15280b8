"""Objectives' extra record fields and registered data formats: validated with the core's error
contract, carried from the file to every batch (padded and packed), reported when unread, and
registered (and refused) like objectives."""

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from pydantic import Field

import align
from align.cli import cli
from align.data.examples import tokenize_records
from align.data.formats import default_batch
from align.data.records import read_records
from align.plugins import load_plugins
from align.plugins.hooks import ObjectiveHooks
from align.testing import registered


class WeightFields(align.Fields):
    weight: float = Field(1.0, ge=0)


class TaggedFields(align.Fields):
    tag: str  # required, no default


class Weighted:
    """A weighted SFT, in-process: the loss reads batch["weight"]."""

    @align.hookimpl
    def align_register_objectives(self, register):
        register(
            align.Objective(
                name="weighted",
                description="weighted sft",
                fields=WeightFields,
                packable=True,
            )
        )

    @align.hookimpl
    def align_loss_counts(self, batch):
        return {"loss": align.sequence_token_counts(batch).sum()}

    @align.hookimpl
    def align_compute_loss(self, model, batch):
        out = align.forward_logps(model, batch)
        return align.LossOutput(
            loss=-(batch["weight"] * out.sums).sum(), count=out.num_tokens.sum()
        )


def _rows():
    return [
        {"prompt": f"What is {a} + 1? ", "completion": f"{a + 1}.", "weight": a / 4, "id": a}
        for a in range(6)
    ]


def test_a_bad_field_value_names_file_line_and_field(tmp_path, write_jsonl, tokenizer):
    rows = _rows()
    rows[2]["weight"] = "heavy"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(align.DataError) as info:
        tokenize_records(
            read_records(path), "prompt_completion", tokenizer, 64, "error", "train", WeightFields
        )
    assert str(info.value) == (
        f"{path}, line 3, field 'weight': expected a number, got str 'heavy'"
    )
    rows[2]["weight"] = -1
    write_jsonl(path, rows)
    with pytest.raises(align.DataError, match=r"line 3, field 'weight': .*greater than or equal"):
        tokenize_records(
            read_records(path), "prompt_completion", tokenizer, 64, "error", "train", WeightFields
        )


def test_missing_values_take_the_default_or_are_refused(tmp_path, write_jsonl, tokenizer):
    rows = _rows()
    rows[1]["weight"] = None
    del rows[2]["weight"]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    examples, _ = tokenize_records(
        read_records(path), "prompt_completion", tokenizer, 64, "error", "train", WeightFields
    )
    assert [e["weight"] for e in examples] == [0.0, 1.0, 1.0, 0.75, 1.0, 1.25]
    with pytest.raises(align.DataError, match=r"line 1, field 'tag': missing field"):
        tokenize_records(
            read_records(path), "prompt_completion", tokenizer, 64, "error", "train", TaggedFields
        )


def test_csv_values_are_parsed_and_an_empty_cell_is_missing(tmp_path, tokenizer):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion", "weight"])
        writer.writeheader()
        writer.writerow({"prompt": "Hi ", "completion": "Hello.", "weight": "0.5"})
        writer.writerow({"prompt": "Bye ", "completion": "Bye.", "weight": ""})
    examples, _ = tokenize_records(
        read_records(path), "prompt_completion", tokenizer, 64, "error", "train", WeightFields
    )
    assert [e["weight"] for e in examples] == [0.5, 1.0]


def test_unread_columns_are_reported(tmp_path, write_jsonl, tokenizer):
    rows = _rows()
    rows[0]["source"] = "web"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    _, report = tokenize_records(
        read_records(path), "prompt_completion", tokenizer, 64, "error", "train", WeightFields
    )
    assert report.summary().endswith("ignored columns: id, source")
    assert report.as_dict()["ignored_columns"] == {"id": 6, "source": 1}
    _, report = tokenize_records(
        read_records(path), "prompt_completion", tokenizer, 64, "error", "train"
    )
    assert report.summary().endswith("ignored columns: id, source, weight")


def _hooks(registry, tokenizer, **config):
    from align.config import resolve

    spec = resolve(registry, None, {"objective": "weighted", **config}, [])
    return ObjectiveHooks(registry, spec, tokenizer)


def test_fields_reach_every_batch_in_both_layouts(tmp_path, write_jsonl, tokenizer, model_dir):
    """One value per example, in the order of the batch's sequences, packed or padded; the
    loss reading them is the same in both layouts."""
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "train.jsonl", _rows())
    with registered(Weighted(), only=True) as registry:
        hooks = _hooks(registry, tokenizer)
        examples, _ = tokenize_records(
            read_records(path), hooks.data_format, tokenizer, 64, "error", "train", WeightFields
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        losses = []
        for packed in (False, True):
            batch = hooks.build_batch(examples[1:5], packed=packed)
            assert batch["weight"].tolist() == [0.25, 0.5, 0.75, 1.0]
            assert batch["weight"].dtype == torch.float32
            with torch.no_grad():
                output, _ = hooks.compute(model, batch, None, None)
            losses.append(float(output.loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0] != pytest.approx(0.0)


def test_fields_survive_truncation_and_a_training_run(tmp_path, write_jsonl, model_dir):
    """keep_end truncation keeps each example's own weight; a run records the ignored column."""
    rows = _rows()
    rows[0]["prompt"] = "long " * 200
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    args = ["run", "--objective", "weighted", "--model", str(model_dir), "--data", str(data)]
    args += ["--max-steps", "2", "--batch-size", "3", "--truncation", "keep_end"]
    args += ["--max-length", "32", "--output-dir", str(out)]
    with registered(Weighted(), only=True):
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "ignored columns: id" in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["data"]["train"]["ignored_columns"] == {"id": 6}
    assert info["data"]["train"]["truncated"] == 1


class Formats:
    """A plugin data format: question/answer records under other column names."""

    @align.hookimpl
    def align_register_formats(self, register):
        register(
            align.DataFormat(
                "qa",
                "question/answer records",
                lambda record: align.Group(
                    f"Q: {record.data['question']}\nA: ",
                    {"": record.data["answer"]},
                    fields={"": "answer"},
                ),
                shape="prompt_completion",
                columns=("question", "answer"),
                samples=tuple({"question": f"{a} + 1?", "answer": f"{a + 1}."} for a in range(4)),
            )
        )

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="qa-sft", description="sft on qa or any of its shape"))

    @align.hookimpl
    def align_compute_loss(self, model, batch):
        out = align.forward_logps(model, batch)
        return align.LossOutput(loss=-(out.sums / out.num_tokens).sum(), count=len(out.sums))


def test_a_plugin_format_tokenises_reports_and_trains(tmp_path, write_jsonl, model_dir, tokenizer):
    rows = [{"question": f"{a} + 1?", "answer": f"{a + 1}.", "note": "x"} for a in range(4)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    with registered(Formats(), only=True) as registry:
        fmt = registry.formats["qa"].item
        assert registry.formats["qa"].plugin.formats == ["qa"]
        examples, report = tokenize_records(read_records(data), fmt, tokenizer, 64, "error", "t")
        assert report.summary().endswith("ignored columns: note")
        text = tokenizer.decode(examples[0]["input_ids"])
        assert "Q: 0 + 1?" in text and "1." in text
        trained = [
            t
            for t, m in zip(examples[0]["input_ids"], examples[0]["completion_mask"], strict=True)
            if m
        ]
        assert "Q:" not in tokenizer.decode(trained)
        result = CliRunner().invoke(
            cli,
            ["run", "--objective", "qa-sft", "--model", str(model_dir), "--data", str(data)]
            + ["--max-steps", "1", "--output-dir", str(tmp_path / "run")],
        )
        assert result.exit_code == 0, result.output
        listing = CliRunner().invoke(cli, ["formats"])
        assert "qa" in listing.output and "question/answer records" in listing.output
        assert "ranked" in listing.output
        bad = [{"question": "1 + 1?", "answer": 2}]
        bad_path = write_jsonl(tmp_path / "bad.jsonl", bad)
        with pytest.raises(align.DataError, match=r"line 1, field 'answer': expected a string"):
            tokenize_records(read_records(bad_path), fmt, tokenizer, 64, "error", "t")


class Refused:
    @align.hookimpl
    def align_register_formats(self, register):
        register(align.DataFormat("preference", "a second one", lambda r: None, shape="preference"))
        register(align.DataFormat("shared", "one of two", lambda r: None, shape="shared"))

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="typo", description="x", shapes=("prefrence",)))
        register(align.Objective(name="mine", description="x", shapes=("preference",)))
        register(align.Objective(name="reads-shared", description="x", shapes=("shared",)))
        register(align.Objective(name="clash", description="x", fields=PromptField))


class AlsoShared:
    @align.hookimpl
    def align_register_formats(self, register):
        register(align.DataFormat("shared", "the other", lambda r: None, shape="shared"))


class PromptField(align.Fields):
    prompt: str = ""


def test_unknown_shapes_format_clashes_and_reserved_fields_are_plugin_errors():
    """A format name taken twice is nobody's: neither registration is used. The core's formats
    stay, and so do the objectives of their shapes (the plugin's own included)."""
    registry = load_plugins(extra=[Refused(), AlsoShared()])
    info = next(p for p in registry.plugins.values() if "typo" in p.objectives)
    text = " ".join(info.errors)
    assert "data format 'preference' is registered more than once: align-core, Refused" in text
    assert "no registered data format yields its shapes (prefrence). Did you mean" in text
    assert "data format 'shared' is registered more than once: Refused, AlsoShared" in text
    assert "'reads-shared': no registered data format yields its shapes (shared)" in text
    assert "(formats registered more than once: shared)" in text
    assert "field 'prompt' is a column of data format 'prompt_completion'" in text
    assert not {"typo", "reads-shared", "clash"} & set(registry.objectives)
    assert "mine" in registry.objectives  # the core's preference format feeds it
    assert "shared" not in registry.formats
    assert registry.formats["preference"].plugin.label == "align-core"
    assert "dpo" in registry.objectives


def test_the_ranked_format(tmp_path, write_jsonl, tokenizer):
    rows = [
        {"prompt": "2 + 2? ", "completions": ["4.", "5.", "22."], "scores": [1, 0.5, 0]},
        {"prompt": "1 + 1? ", "completions": ["3.", "2."], "ranks": [2, 1]},
    ]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    examples, _ = tokenize_records(read_records(path), "ranked", tokenizer, 64, "error", "t")
    assert examples[0]["scores"] == [1.0, 0.5, 0.0]
    assert examples[1]["scores"] == [-2.0, -1.0]
    assert "completion2_input_ids" in examples[0] and "completion2_input_ids" not in examples[1]
    padded = default_batch("ranked", examples, tokenizer.pad_token_id)
    packed = default_batch("ranked", examples, tokenizer.pad_token_id, packed=True)
    for batch in (padded, packed):
        assert batch["group"].tolist() == [0, 0, 0, 1, 1]
        assert batch["scores"].tolist() == [1.0, 0.5, 0.0, -2.0, -1.0]
    assert (
        align.sequence_token_counts(padded).tolist() == align.sequence_token_counts(packed).tolist()
    )
    for bad, message in [
        ({"prompt": "x", "completions": ["a"], "scores": [1]}, "field 'completions'"),
        ({"prompt": "x", "completions": ["a", "b"], "scores": [1]}, "scores has 1 values for 2"),
        ({"prompt": "x", "completions": ["a", "b"]}, "give either scores"),
        ({"prompt": "x", "completions": ["a", 3], "scores": [1, 2]}, "field 'completions[1]'"),
    ]:
        write_jsonl(path, [bad])
        with pytest.raises(align.DataError, match=message.replace("[", r"\[")):
            tokenize_records(read_records(path), "ranked", tokenizer, 64, "error", "t")


class SelfPacking:
    """A plugin that builds its own batches, packed with align.packing when the run packs."""

    seen: list = []

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="self-packing", description="x", packable=True))

    @align.hookimpl
    def align_build_batch(self, examples, tokenizer, config, packed):
        from align.packing import pack

        self.seen.append((packed, config.max_length))
        if packed:
            groups = [[(e["input_ids"], e["completion_mask"])] for e in examples]
            return pack(groups, tokenizer.pad_token_id)
        return align.sequence_batch(examples, tokenizer.pad_token_id)

    @align.hookimpl
    def align_compute_loss(self, model, batch):
        out = align.forward_logps(model, batch)
        return align.LossOutput(loss=-(out.sums / out.num_tokens).sum(), count=len(out.sums))


def test_a_plugin_batch_is_told_whether_the_run_packs(tmp_path, write_jsonl, sft_rows, model_dir):
    """The hook hears the run's layout, and its packed batches give the padded loss."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    losses = {}
    for padding_free in (True, False):
        out = tmp_path / f"run-{padding_free}"
        args = ["run", "--objective", "self-packing", "--model", str(model_dir)]
        args += ["--data", str(data), "--max-steps", "1", "--max-length", "48"]
        args += ["--output-dir", str(out)] + ([] if padding_free else ["--no-padding-free"])
        SelfPacking.seen = []
        with registered(SelfPacking(), only=True):
            result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert SelfPacking.seen and set(SelfPacking.seen) == {(padding_free, 48)}
        losses[padding_free] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])[
            "loss"
        ]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_reference_cache_keys_depend_on_tokens_not_on_fields(tmp_path, write_jsonl, tokenizer):
    """A reference log-prob depends on the tokens scored alone: changing an example's weight
    keeps the precomputed cache's key, changing its tokens does not."""
    from align.reference.precompute import SequenceIndex, cache_key

    def key(rows):
        path = write_jsonl(tmp_path / "k.jsonl", rows)
        examples, _ = tokenize_records(
            read_records(path), "prompt_completion", tokenizer, 64, "error", "t", WeightFields
        )
        return cache_key({"model": "m"}, SequenceIndex(examples))

    rows = _rows()
    base = key(rows)
    rows[0]["weight"] = 7.0
    assert key(rows) == base
    rows[0]["completion"] = "something else."
    assert key(rows) != base


class GroupField(align.Fields):
    group: int = 0


class ValueField(align.Fields):
    extra: float = 0.0


def test_a_field_cannot_shadow_what_the_format_gives():
    """A field named like a key of the format's batches is refused at registration; one named
    like a value a plugin format gives its examples is a data error, never silently replaced."""

    class Shadowing:
        @align.hookimpl
        def align_register_formats(self, register):
            register(
                align.DataFormat(
                    "valued",
                    "x",
                    lambda r: align.Group(r.data["p"], {"": r.data["a"]}, values={"extra": 1.0}),
                    shape="valued",
                    columns=("p", "a"),
                )
            )

        @align.hookimpl
        def align_register_objectives(self, register):
            register(
                align.Objective(name="g", description="x", shapes=("ranked",), fields=GroupField)
            )
            register(
                align.Objective(name="v", description="x", shapes=("valued",), fields=ValueField)
            )

    registry = load_plugins(extra=[Shadowing()])
    assert "g" not in registry.objectives and "v" in registry.objectives
    info = next(p for p in registry.plugins.values() if "g" in p.objectives)
    assert "field 'group' is a name the core's batches use" in " ".join(info.errors)
    record = align.Record({"p": "1 + 1? ", "a": "2.", "extra": 3.0}, "d.jsonl", "line 1")
    with pytest.raises(align.DataError, match="value named 'extra'"):
        tokenize_records(
            [record], registry.formats["valued"].item, _Tok(), 64, "error", "t", ValueField
        )


class _Tok:
    """Just enough tokenizer for one prompt/completion record."""

    eos_token_id, bos_token_id, is_fast = 0, None, False

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return {"input_ids": [ord(c) % 50 + 1 for c in text]}
