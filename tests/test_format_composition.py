"""Formats and objectives meet by shape: a ShareGPT file trains every conversation objective
exactly as the same conversations written as messages; `--format` and detection from the
columns; TRL's implicit-prompt preference records; FormatConformance on the first-party formats
and on a format that trains the wrong turns."""

import json

import pytest
from click.testing import CliRunner

import align
from align.cli import cli
from align.data.examples import tokenize_records
from align.data.formats import BUILTIN, _sharegpt, implicit_prompt
from align.data.records import Record, read_records
from align.plugins.format_conformance import FormatConformance
from align.testing import registered

TURNS = [
    ("What is 1 + 2?", "1 + 2 = 3."),
    ("What is 10 + 20?", "30."),
    ("And 3 + 4?", "3 + 4 = 7."),
    ("What is 7 + 30?", "37."),
]
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def _sharegpt_rows() -> list[dict]:
    rows = []
    for i in range(8):
        first, second = TURNS[i % 4], TURNS[(i + 1) % 4]
        turns = [
            {"from": "human", "value": first[0]},
            {"from": "gpt", "value": first[1]},
        ]
        if i % 2:
            turns += [{"from": "human", "value": second[0]}, {"from": "gpt", "value": second[1]}]
        row = {"conversations": turns}
        if i % 3 == 0:
            row["system"] = "You add numbers."
        if i % 3 == 1:
            row["conversations"] = [{"from": "system", "value": "Be brief."}, *turns]
        rows.append(row)
    return rows


def _as_messages(row: dict) -> dict:
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    messages += [{"role": ROLE[t["from"]], "content": t["value"]} for t in row["conversations"]]
    return {"messages": messages}


@pytest.fixture
def files(tmp_path, write_jsonl):
    rows = _sharegpt_rows()
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    messages = write_jsonl(tmp_path / "messages.jsonl", [_as_messages(r) for r in rows])
    return sharegpt, messages


def test_sharegpt_records_tokenise_as_the_same_messages(files, tokenizer):
    sharegpt, messages = files
    got, report = tokenize_records(
        read_records(sharegpt), BUILTIN["sharegpt"], tokenizer, 256, "error", "t"
    )
    want, _ = tokenize_records(
        read_records(messages), BUILTIN["prompt_completion"], tokenizer, 256, "error", "t"
    )
    assert report.examples == 8 and not report.ignored_columns
    for a, b in zip(got, want, strict=True):
        assert a["input_ids"] == b["input_ids"]
        assert a["completion_mask"] == b["completion_mask"]
        assert sum(a["completion_mask"]) > 0


def _step_one(tmp_path, model_dir, objective, data, *extra):
    out = tmp_path / f"{objective}-{data.stem}"
    args = ["run", "--objective", objective, "--model", str(model_dir), "--data", str(data)]
    args += ["--max-steps", "1", "--batch-size", "4", "--output-dir", str(out), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((out / "run.json").read_text())
    return next(r for r in rows if "loss" in r), info


@pytest.mark.parametrize("objective", ["sft", "minorsft", "ift", "lora-sft"])
def test_a_sharegpt_file_trains_every_conversation_objective_as_messages(
    tmp_path, model_dir, files, objective
):
    """The done-when of issue 27: no copy of any loss, the same step as the messages file."""
    sharegpt, messages = files
    got, info = _step_one(tmp_path, model_dir, objective, sharegpt)
    want, _ = _step_one(tmp_path, model_dir, objective, messages)
    assert info["data"]["train"]["format"] == "sharegpt (detected from its columns)"
    for name in ("loss", "grad_norm", "num_tokens"):
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-7), name


def test_format_is_picked_checked_against_the_shape_and_detected(tmp_path, model_dir, files):
    sharegpt, _ = files
    base = ["inspect", "--model", str(model_dir), "--data", str(sharegpt), "-n", "1"]
    result = CliRunner().invoke(cli, [*base, "--format", "sharegpt"])
    assert result.exit_code == 0, result.output
    assert "format sharegpt (--format)" in result.output
    result = CliRunner().invoke(cli, [*base, "--format", "sharegtp"])
    assert result.exit_code == 1
    assert "--format sharegtp: unknown data format. Did you mean 'sharegpt'?" in result.output
    result = CliRunner().invoke(cli, [*base, "--objective", "dpo", "--format", "sharegpt"])
    assert result.exit_code == 1
    assert "yields conversation records, and objective 'dpo' trains on preference" in result.output
    assert "formats that feed it: preference" in result.output
    result = CliRunner().invoke(cli, [*base, "--objective", "dpo"])
    assert result.exit_code == 1
    assert (
        "no data format of objective 'dpo' (preference) reads the first record's" in result.output
    )
    assert "columns conversations, system" in result.output
    assert "preference reads chosen+rejected" in result.output


class OtherConversations:
    """A second format that reads `conversations` columns: a file of them is ambiguous."""

    @align.hookimpl
    def align_register_formats(self, register):
        register(
            align.DataFormat(
                "conversations-v2",
                "x",
                _sharegpt,
                shape="conversation",
                columns=("conversations",),
            )
        )


def test_a_plugin_format_does_not_change_how_core_data_is_read(tmp_path, model_dir, files):
    """Installing a format that fits the same columns leaves the core's in charge, and says so."""
    sharegpt, _ = files
    args = ["inspect", "--model", str(model_dir), "--data", str(sharegpt), "-n", "1"]
    with registered(OtherConversations()):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert (
            "format sharegpt (detected from its columns; they also fit conversations-v2: pick "
            "one with --format)"
        ) in result.output
        chosen = CliRunner().invoke(cli, [*args, "--format", "conversations-v2"])
        assert "format conversations-v2 (--format)" in chosen.output


class QuestionAnswer:
    """Two plugin formats of one shape that read the same columns: their files are ambiguous."""

    @align.hookimpl
    def align_register_formats(self, register):
        for name in ("qa-one", "qa-two"):
            register(
                align.DataFormat(
                    name,
                    "x",
                    lambda r: align.Group(r.data["question"], {"": r.data["answer"]}),
                    shape="prompt_completion",
                    columns=("question", "answer"),
                )
            )


def test_an_ambiguous_file_lists_the_candidates(tmp_path, model_dir, write_jsonl):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1 + 1? ", "answer": "2."}] * 2)
    args = ["inspect", "--model", str(model_dir), "--data", str(data), "-n", "1"]
    with registered(QuestionAnswer()):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1
        assert "first record's columns answer, question fit several data formats" in result.output
        assert "qa-one (question+answer), qa-two (question+answer)" in result.output
        assert "pick one with --format NAME" in result.output
        assert CliRunner().invoke(cli, [*args, "--format", "qa-two"]).exit_code == 0


def test_null_columns_do_not_decide_the_format(tmp_path, model_dir, write_jsonl):
    """Parquet files and hub datasets give every record every column, null where it has none:
    a null `conversations` does not make a DPO file ShareGPT's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "1 + 1? ", "chosen": "2.", "rejected": "3.", "conversations": None}] * 4
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    args = ["inspect", "--objective", "dpo", "--model", str(model_dir), "--data", str(path)]
    result = CliRunner().invoke(cli, [*args, "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "format preference (detected from its columns)" in result.output


def test_a_mixture_source_may_name_its_own_format(tmp_path, model_dir, files):
    sharegpt, messages = files
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  - path: {sharegpt}\n    format: sharegpt\n  - path: {messages}\n",
        encoding="utf-8",
    )
    out = tmp_path / "own-format"
    args = ["run", "--model", str(model_dir), "--config", str(config), "--max-steps", "1"]
    result = CliRunner().invoke(cli, [*args, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    sources = json.loads((out / "run.json").read_text())["data"]["train"]["sources"]
    assert [s["format"] for s in sources] == [
        "sharegpt (the source)",
        "prompt_completion (detected from its columns)",
    ]


def test_a_missing_column_is_named_by_the_nearest_format(tmp_path, model_dir, write_jsonl):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1 + 1? ", "chosen": "2."}])
    args = ["inspect", "--objective", "dpo", "--model", str(model_dir), "--data", str(data)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "line 1, field 'rejected': missing field" in result.output


def test_align_formats_shows_the_shape_and_the_objectives_each_feeds():
    result = CliRunner().invoke(cli, ["formats", "--json"])
    assert result.exit_code == 0, result.output
    listed = {item["name"]: item for item in json.loads(result.output)}
    assert listed["sharegpt"]["shape"] == "conversation"
    assert {"sft", "minorsft", "ift", "lora-sft"} <= set(listed["sharegpt"]["objectives"])
    assert listed["preference"]["objectives"] == ["dpo", "orpo", "reward-model"]
    assert listed["prompt_completion"]["detected_by"] == [
        ["prompt", "completion"],
        ["messages"],
        ["text"],
    ]
    text = CliRunner().invoke(cli, ["formats"]).output
    assert "feeds: distill, ift, lora-sft, minorsft, sft" in text


# -- ShareGPT's errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"conversations": [{"from": "humna", "value": "x"}]},
            "field 'conversations[0].from': unknown role tag 'humna'. Did you mean 'human'?",
        ),
        ({"conversations": [{"from": "human"}]}, "field 'conversations[0].value': missing field"),
        (
            {"conversations": [{"from": "gpt", "value": 3}]},
            "field 'conversations[0].value': expected a string, got int",
        ),
        (
            {"conversations": [{"from": "human", "value": "x"}, {"from": "system", "value": "y"}]},
            "field 'conversations[1].from': a system turn comes first",
        ),
        (
            {"conversations": [{"from": "system", "value": "y"}], "system": "z"},
            "field 'system': the record has a system field and a first system turn",
        ),
        ({"conversations": []}, "field 'conversations': expected a non-empty list of turns"),
        ({"conversations": None}, "field 'conversations': is null"),
        ({"conversations": ["hi"]}, "field 'conversations[0]': expected a turn"),
    ],
)
def test_sharegpt_errors_name_the_line_and_field(row, message):
    record = Record(row, "d.jsonl", "line 3")
    with pytest.raises(align.DataError) as error:
        _sharegpt(record)
    assert f"d.jsonl, line 3, {message}" in str(error.value)


def test_function_calls_train_and_observations_do_not(tokenizer):
    row = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "weather"}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ]
    }
    group = _sharegpt(Record(row, "d", "line 1"))
    roles = [m["role"] for m in group.answers[""]]
    assert roles == ["user", "assistant", "tool", "assistant"]


# -- TRL's implicit prompt -----------------------------------------------------------------------
IMPLICIT = [
    {
        "chosen": [
            {"role": "user", "content": "What is 1 + 2?"},
            {"role": "assistant", "content": "3."},
        ],
        "rejected": [
            {"role": "user", "content": "What is 1 + 2?"},
            {"role": "assistant", "content": "No."},
        ],
    },
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "What is 3 + 4? 7.", "rejected": "What is 3 + 4? 8 or so."},
    {
        "chosen": [
            {"role": "system", "content": "Add."},
            {"role": "user", "content": "10 + 20?"},
            {"role": "assistant", "content": "30."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "rejected": [
            {"role": "system", "content": "Add."},
            {"role": "user", "content": "10 + 20?"},
            {"role": "assistant", "content": "31."},
        ],
    },
]


@pytest.mark.parametrize("row", IMPLICIT)
def test_the_implicit_prompt_is_trls(row):
    """An independent computation: TRL 1.16's own extract_prompt."""
    from trl.data_utils import extract_prompt

    prompt, chosen, rejected = implicit_prompt(Record(row, "d", "line 1"))
    expected = extract_prompt(row)
    assert (prompt, chosen, rejected) == (
        expected["prompt"],
        expected["chosen"],
        expected["rejected"],
    )


def test_implicit_prompt_records_train_dpo_as_explicit_ones(tmp_path, model_dir, write_jsonl):
    rows = [IMPLICIT[0], IMPLICIT[3]] * 2
    implicit = write_jsonl(tmp_path / "implicit.jsonl", rows)
    explicit_rows = []
    for row in rows:
        prompt, chosen, rejected = implicit_prompt(Record(row, "d", "line 1"))
        explicit_rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    explicit = write_jsonl(tmp_path / "explicit.jsonl", explicit_rows)
    got, _ = _step_one(tmp_path, model_dir, "dpo", implicit, "--reference", "model")
    want, _ = _step_one(tmp_path, model_dir, "dpo", explicit, "--reference", "model")
    for name in ("loss", "grad_norm"):
        assert got[name] == pytest.approx(want[name], rel=1e-6), name


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"chosen": "Same.", "rejected": "Same."},
            "field 'chosen': has no prompt field, and one of",
        ),
        (
            {"chosen": "A", "rejected": "B"},
            "field 'chosen': has no prompt field, and chosen and rejected have no common start",
        ),
        (
            {"chosen": "A b", "rejected": [{"role": "user", "content": "A"}]},
            "field 'rejected': with no prompt field, chosen and rejected must both be text or",
        ),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt': is null"),
    ],
)
def test_implicit_prompt_errors(row, message):
    with pytest.raises(align.DataError) as error:
        implicit_prompt(Record(row, "d.jsonl", "line 2"))
    assert f"d.jsonl, line 2, {message}" in str(error.value)


# -- FormatConformance -----------------------------------------------------------------------------
# Every core format runs the suite a plugin's format runs: TestSharegptConformance, …
for _name in BUILTIN:
    _suite = f"Test{_name.title().replace('_', '')}Conformance"
    globals()[_suite] = type(_suite, (FormatConformance,), {"format": _name})


def _wrong_turns(record):
    """ShareGPT with human and gpt swapped: the human turns are trained."""
    swap = {"user": "assistant", "assistant": "user"}
    messages = [
        {**m, "role": swap.get(m["role"], m["role"])} for m in _sharegpt(record).answers[""]
    ]
    return align.Group(None, {"": messages}, fields={"": "conversations"})


class WrongTurns:
    @align.hookimpl
    def align_register_formats(self, register):
        fmt = BUILTIN["sharegpt"]
        register(
            align.DataFormat(
                "wrong-turns",
                "trains the human turns",
                _wrong_turns,
                shape="conversation",
                columns=fmt.columns,
                detect=fmt.detect,
                samples=fmt.samples,
                trained=fmt.trained,
            )
        )


def test_a_format_that_trains_the_wrong_turns_fails_its_suite():
    from align import demo

    suite = FormatConformance()
    with registered(WrongTurns(), only=True) as registry:
        fmt = registry.formats["wrong-turns"].item
        suite.format = "wrong-turns"
        with pytest.raises(AssertionError) as failure:
            suite.test_each_sequence_trains_on_the_declared_text(fmt, demo.build_tokenizer())
    message = str(failure.value)
    assert "sample 1, sequence 'sequence': the core trains on ['What is 1 + 2?']" in message
    assert "the format declares ['1 + 2 = 3.']" in message
    assert "[[What is 1 + 2?</s>]]" in message
    suite.test_groups_are_of_the_declared_shape(fmt)  # the shape is right, the turns are not


def test_a_format_whose_groups_are_not_its_shape_fails_its_suite():
    def unpaired(record):
        return align.Group(record.data["prompt"], {"": record.data["chosen"]})

    fmt = align.DataFormat(
        "half", "x", unpaired, shape="preference", columns=("prompt", "chosen"),
        samples=({"prompt": "a", "chosen": "b"},), trained=(["b"],),
    )  # fmt: skip
    with pytest.raises(
        AssertionError,
        match=r"declares shape 'preference' .* answers ''; the shape has 'chosen_', 'rejected_'",
    ):
        FormatConformance().test_groups_are_of_the_declared_shape(fmt)


def test_a_format_of_a_core_shape_may_not_bring_its_own_batch():
    with pytest.raises(TypeError, match="shape 'preference' is the core's"):
        align.DataFormat("p", "x", lambda r: None, shape="preference", batch=lambda *a: {})
    with pytest.raises(TypeError, match="are batched differently"):
        align.Objective("o", "x", shapes=("preference", "feedback"))


def test_the_demo_model_trains_on_your_own_data(tmp_path, files):
    """`--model demo --data FILE`: the demo model and its defaults, your data in any format."""
    sharegpt, _ = files
    out = tmp_path / "demo-own"
    args = ["run", "--model", "demo", "--data", str(sharegpt), "--max-steps", "2"]
    result = CliRunner().invoke(cli, [*args, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["model"].endswith("tiny-llama-v3")
    assert info["config"]["data"] == str(sharegpt) and info["config"]["eval_data"] is None
    assert info["config"]["lr"] == 3e-3  # the demo's
    assert info["data"]["train"]["format"] == "sharegpt (detected from its columns)"


def test_a_group_not_of_the_formats_shape_is_an_error_at_run_time(tokenizer):
    fmt = align.DataFormat(
        "half", "x", lambda r: align.Group(r.data["p"], {"": "a"}), shape="preference",
        columns=("p",),
    )  # fmt: skip
    record = Record({"p": "q"}, "d.jsonl", "line 5")
    with pytest.raises(align.DataError) as error:
        tokenize_records([record], fmt, tokenizer, 64, "error", "t")
    assert "d.jsonl, line 5: data format 'half' declares shape 'preference', but gave" in str(
        error.value
    )
    assert "answers ''; the shape has 'chosen_', 'rejected_'" in str(error.value)


# -- LLaMA-Factory's ShareGPT preference (ranking) and KTO records ------------------------------
def _sharegpt_pairs() -> list[dict]:
    rows = []
    for i, (question, answer) in enumerate(TURNS * 2):
        rows.append(
            {
                "conversations": [{"from": "human", "value": question}],
                "chosen": {"from": "gpt", "value": answer},
                "rejected": {"from": "gpt", "value": "No idea."},
                **({"system": "You add numbers."} if i % 2 else {}),
            }
        )
    return rows


def _as_preference(row: dict) -> dict:
    prompt = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    prompt += [{"role": ROLE[t["from"]], "content": t["value"]} for t in row["conversations"]]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
    }


def test_sharegpt_preference_records_train_dpo_as_the_same_messages(
    tmp_path, model_dir, write_jsonl
):
    """The most specific format wins: conversations+chosen+rejected over chosen+rejected."""
    rows = _sharegpt_pairs()
    sharegpt = write_jsonl(tmp_path / "pairs.jsonl", rows)
    messages = write_jsonl(tmp_path / "messages.jsonl", [_as_preference(r) for r in rows])
    got, info = _step_one(tmp_path, model_dir, "dpo", sharegpt, "--reference", "model")
    want, _ = _step_one(tmp_path, model_dir, "dpo", messages, "--reference", "model")
    assert info["data"]["train"]["format"] == "sharegpt_preference (detected from its columns)"
    for name in ("loss", "grad_norm"):
        assert got[name] == pytest.approx(want[name], rel=1e-6), name


def test_sharegpt_kto_records_train_kto_as_the_same_messages(tmp_path, model_dir, write_jsonl):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer if i % 2 else "No idea."},
            ],
            "kto_tag": bool(i % 2),
        }
        for i, (question, answer) in enumerate(TURNS * 2)
    ]
    feedback = [
        {
            "prompt": [{"role": "user", "content": r["conversations"][0]["value"]}],
            "completion": [{"role": "assistant", "content": r["conversations"][1]["value"]}],
            "label": r["kto_tag"],
        }
        for r in rows
    ]
    sharegpt = write_jsonl(tmp_path / "kto.jsonl", rows)
    messages = write_jsonl(tmp_path / "messages.jsonl", feedback)
    got, info = _step_one(tmp_path, model_dir, "kto", sharegpt, "--reference", "model")
    want, _ = _step_one(tmp_path, model_dir, "kto", messages, "--reference", "model")
    assert info["data"]["train"]["format"] == "sharegpt_feedback (detected from its columns)"
    for name in ("loss", "grad_norm"):
        assert got[name] == pytest.approx(want[name], rel=1e-6), name


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {
                "conversations": [{"from": "human", "value": "q"}],
                "chosen": {"from": "gpt", "value": "a"},
            },
            "field 'rejected': missing field",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            },
            "field 'conversations[1].from': the conversation before the answers ends with",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "q"}],
                "chosen": {"from": "human", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            },
            "field 'chosen.from': the answer is the assistant's turn (gpt), got 'human'",
        ),
    ],
)
def test_sharegpt_preference_errors(row, message):
    from align.data.formats import _sharegpt_preference

    with pytest.raises(align.DataError) as error:
        _sharegpt_preference(Record(row, "d.jsonl", "line 4"))
    assert f"d.jsonl, line 4, {message}" in str(error.value)


def test_sharegpt_kto_errors():
    from align.data.formats import _sharegpt_feedback

    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    for row, message in [
        ({"conversations": turns, "kto_tag": "yes"}, "field 'kto_tag': expected a boolean"),
        ({"conversations": turns[:1], "kto_tag": True}, "field 'conversations[0].from': the last"),
    ]:
        with pytest.raises(align.DataError) as error:
            _sharegpt_feedback(Record(row, "d.jsonl", "line 2"))
        assert f"d.jsonl, line 2, {message}" in str(error.value)


def test_a_mixture_reads_each_source_in_its_own_format(tmp_path, model_dir, files):
    sharegpt, messages = files
    out = tmp_path / "mixed"
    args = ["run", "--model", str(model_dir), "--data", f"{sharegpt}:4", "--data", str(messages)]
    result = CliRunner().invoke(cli, [*args, "--max-steps", "1", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    train = json.loads((out / "run.json").read_text())["data"]["train"]
    formats = [source["format"] for source in train["sources"]]
    assert formats == [
        "sharegpt (detected from its columns)",
        "prompt_completion (detected from its columns)",
    ]
    assert train["examples"] == 4 + 8


def test_an_objective_written_for_data_format_is_told_the_new_spelling():
    with pytest.raises(TypeError, match=r"data_format= is replaced by shapes=.*shapes=\(\"pref"):
        align.Objective("old", "x", data_format="preference")


class SystemField(align.Fields):
    system: str = ""  # a column sharegpt reads, not the objective's default format


def test_a_field_named_like_another_formats_column_registers():
    class Plugin:
        @align.hookimpl
        def align_register_objectives(self, register):
            register(align.Objective("sys-sft", "x", fields=SystemField))

    with registered(Plugin(), only=True) as registry:
        assert "sys-sft" in registry.objectives


def test_role_and_content_turns_are_pointed_to_the_messages_column():
    row = {"conversations": [{"role": "user", "content": "q"}]}
    with pytest.raises(align.DataError, match="are chat messages .*conversations=messages"):
        _sharegpt(Record(row, "d.jsonl", "line 1"))


class WeightedPairs:
    """A plugin format that fits prompt+completion+weight files, as the core's does."""

    @align.hookimpl
    def align_register_formats(self, register):
        register(
            align.DataFormat(
                "weighted-pc",
                "x",
                lambda r: align.Group(r.data["prompt"], {"": r.data["completion"]}),
                shape="prompt_completion",
                columns=("prompt", "completion", "weight"),
            )
        )


def test_a_resumed_run_reads_its_data_in_the_format_it_started_with(
    tmp_path, model_dir, write_jsonl, sft_rows, crash_copy
):
    """A plugin installed since cannot change how a core file is read (the core's format wins
    over one that fits more of its columns), and a run resumed with another --format is
    refused; with the same formats, --format may be given."""
    rows = [{**row, "weight": 1.0} for row in sft_rows]
    data = write_jsonl(tmp_path / "w.jsonl", rows)
    done = tmp_path / "done"
    args = ["run", "--model", str(model_dir), "--data", str(data), "--max-steps", "2"]
    args += ["--batch-size", "4", "--save-every", "1"]
    result = CliRunner().invoke(cli, [*args, "--output-dir", str(done)])
    assert result.exit_code == 0, result.output
    stopped = tmp_path / "stopped"
    crash_copy(done, stopped, 1, 1)
    resume = [*args, "--output-dir", str(stopped), "--resume"]
    with registered(WeightedPairs()):
        result = CliRunner().invoke(cli, resume)
        assert result.exit_code == 0, result.output
        assert "they also fit weighted-pc: pick one with --format" in result.output
        crash_copy(done, stopped.with_name("again"), 1, 1)
        other = [*args, "--output-dir", str(stopped.with_name("again")), "--resume"]
        result = CliRunner().invoke(cli, [*other, "--format", "weighted-pc"])
    assert result.exit_code == 1
    assert "the train data was read as prompt_completion (detected" in result.output
    assert "and now as weighted-pc (--format)" in result.output
    result = CliRunner().invoke(cli, [*other, "--format", "prompt_completion"])
    assert result.exit_code == 0, result.output
