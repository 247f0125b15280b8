"""align compare and align.compare: the grid's runs (each an ordinary run), the evaluations of
every model on held-out sets (checked against an independent computation), the table in both
layouts, the kept-vs-learned plot, resuming (an interrupted run resumes, finished ones are kept,
a missing one is trained) and the errors."""

import json
import math
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import align
from align.cli import cli
from align.comparison.grid import Grid
from align.comparison.report import figure_of
from align.errors import ConfigError
from align.plugins import get_registry

SUMS = [(3, 4), (10, 20), (7, 30), (12, 1), (25, 5), (40, 2)]
DIFFERENCES = [(9, 4), (30, 20), (37, 30), (12, 1), (25, 5), (40, 2)]
STEPS = ["--max-steps", "2", "--data-workers", "1", "--eval-every", "100"]


def _records(pairs, op):
    rows = []
    for a, b in pairs:
        value = a + b if op == "+" else a - b
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} {op} {b}?"}],
                "completion": [{"role": "assistant", "content": f"{a} {op} {b} = {value}."}],
                "answer": value,
            }
        )
    return rows


@pytest.fixture
def eval_files(tmp_path, write_jsonl):
    return (
        write_jsonl(tmp_path / "sub.jsonl", _records(DIFFERENCES, "-")),
        write_jsonl(tmp_path / "add.jsonl", _records(SUMS, "+")),
    )


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _compare(*args):
    return CliRunner().invoke(cli, ["compare", *args], catch_exceptions=False)


def _grid_args(eval_files, out="cmp"):
    sub, add = eval_files
    return [
        "--objective", "sft,minorsft", "--lr", "1e-3,3e-3", "--set", "beta=0.1", *STEPS,
        "--eval", f"sub={sub}", "--eval", f"add={add}", "--eval-reward", "addition",
        "--save-every", "1", "--output-dir", out,
    ]  # fmt: skip


def _answer_nll(model_dir, records):
    """The mean NLL of the answers' tokens, computed here with transformers alone: the chat
    template renders prompt and prompt + answer; the answer's tokens (with its EOS) are those
    after the prompt's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for record in records:
        prompt = tokenizer.apply_chat_template(
            record["prompt"], tokenize=False, add_generation_prompt=True
        )
        whole = tokenizer.apply_chat_template(
            record["prompt"] + record["completion"], tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
        ids = ids[: ids.index(tokenizer.eos_token_id, len(prompt_ids)) + 1]  # up to its EOS
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logps = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
        total -= float(logps[len(prompt_ids) - 1 :].sum())
        count += len(ids) - len(prompt_ids)
    return total / count


def _greedy(model_dir, record, tokens=16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer.apply_chat_template(
        record["prompt"], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=tokens, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


# -- the grid ----------------------------------------------------------------------------------
def test_an_objective_option_varies_only_the_objectives_that_have_it():
    grid = Grid(["sft", "minorsft"], {"lr": [1e-3, 3e-3], "beta": [0.1, 0.01]}, [42, 43])
    names = [c.name for c in grid.cells(get_registry())]
    assert len(names) == 2 * 2 + 2 * 2 * 2  # sft: lr × seeds; minorsft: lr × beta × seeds
    assert "sft-lr0.001-seed42" in names and "minorsft-lr0.003-beta0.01-seed43" in names
    assert not any(n.startswith("sft-") and "beta" in n for n in names)


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"betta": [0.1]}, "Did you mean 'beta'"),
        ({"sft.beta": [0.1]}, "objective 'sft' has no option 'beta'"),
        ({"lora.rank": [4]}, "section 'lora' has no option 'rank'"),
    ],
)
def test_an_axis_no_objective_takes_is_refused(axes, message):
    with pytest.raises(ConfigError, match=message):
        Grid(["sft", "minorsft"], axes, [42]).cells(get_registry())


# -- a comparison end to end ---------------------------------------------------------------------
def test_a_small_grid_on_the_demo_runs_evaluates_and_tables_every_run(eval_files, tmp_path):
    result = _compare(*_grid_args(eval_files))
    assert result.exit_code == 0, result.output
    out = tmp_path / "cmp"
    names = ["sft-lr0.001-seed42", "sft-lr0.003-seed42"]
    names += ["minorsft-lr0.001-seed42", "minorsft-lr0.003-seed42"]
    for name in names:  # each an ordinary, completed run
        record = json.loads((out / "runs" / name / "run.json").read_text())
        assert record["status"] == "completed" and record["total_steps"] == 2
        assert record["config"]["lr"] == (1e-3 if "0.001" in name else 3e-3)
    minorsft = json.loads((out / "runs" / names[2] / "run.json").read_text())
    assert minorsft["config"]["minorsft"]["beta"] == 0.1

    table = json.loads((out / "results.json").read_text())["rows"]
    assert [r["run"] for r in table] == ["starting model", *names]
    for row in table:
        for name in ("sub", "add"):
            found = row["sets"][name]
            assert found["examples"] == 6 and 0 <= found["addition"] <= 1
            assert math.isfinite(found["nll"]) and found["nll"] > 0
    # the NLL, against an independent computation from the saved model
    sft = table[1]
    expected = _answer_nll(out / "runs" / names[0] / "final", _records(DIFFERENCES, "-"))
    assert sft["sets"]["sub"]["nll"] == pytest.approx(expected, rel=1e-5)
    start = _answer_nll(align.demo.demo_model_path(), _records(SUMS, "+"))
    assert table[0]["sets"]["add"]["nll"] == pytest.approx(start, rel=1e-5)
    # the greedy answers the reward scored, as transformers' greedy generate gives them
    answers = [
        json.loads(x) for x in (out / "evals" / names[0] / "sub.jsonl").read_text().splitlines()
    ]
    assert len(answers) == 6
    for answer, record in zip(answers[:2], _records(DIFFERENCES, "-"), strict=False):
        assert answer["completion"] == _greedy(out / "runs" / names[0] / "final", record)
    assert sft["sets"]["sub"]["addition"] == sum(a["addition"] for a in answers) / 6

    markdown = (out / "results.md").read_text()
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| run"))
    assert header == (
        "| run | lr | seed | steps | status | sub addition | sub nll | add addition | add nll |"
    )
    assert "Every run (with the option): beta 0.1." in markdown
    assert sum(line.startswith("| sft-") or line.startswith("| minorsft-") for line in lines) == 4
    row = next(line for line in lines if line.startswith(f"| {names[0]} "))
    assert f"{sft['sets']['sub']['nll']:.2f}" in row
    assert markdown.strip() in result.output
    png = out / "kept-vs-learned.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_draws_one_curve_per_objective_through_its_learning_rates():
    def sets(sub, add):
        return {"sub": {"addition": sub, "nll": 1.0}, "add": {"addition": add, "nll": 2.0}}

    table = [
        {"run": "starting model", "sets": sets(0.0, 0.6)},
        {"run": "a", "objective": "sft", "lr": 3e-3, "seed": 1, "sets": sets(0.4, 0.1)},
        {"run": "b", "objective": "sft", "lr": 1e-3, "seed": 1, "sets": sets(0.2, 0.3)},
        {"run": "c", "objective": "sft", "lr": 1e-3, "seed": 2, "sets": sets(0.3, 0.2)},
        {"run": "d", "objective": "minorsft", "lr": 1e-3, "beta": 0.1, "seed": 1,
         "sets": sets(0.1, 0.5)},
    ]  # fmt: skip
    figure = figure_of(table, ["sub", "add"], ["lr", "beta"], "test")
    axis = figure.axes[0]
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert set(lines) == {"sft", "minorsft beta 0.1", "starting model"}
    sft = lines["sft"]  # lr ascending; the mean of the two seeds at 1e-3
    assert list(sft.get_xdata()) == pytest.approx([0.25, 0.4])
    assert list(sft.get_ydata()) == pytest.approx([0.25, 0.1])
    assert list(lines["starting model"].get_xdata()) == [0.0]
    assert axis.get_xlabel() == "learned: sub addition"
    assert axis.get_ylabel() == "kept: add addition"
    nll = figure.axes[1]  # the second row: the same curves by the answers' NLL
    assert nll.get_xlabel() == "learned: sub nll (lower is better)"
    assert nll.xaxis_inverted() and nll.yaxis_inverted()
    nll_lines = {line.get_label(): line for line in nll.get_lines()}
    assert list(nll_lines["sft"].get_ydata()) == pytest.approx([2.0, 2.0])


def test_resume_resumes_an_interrupted_run_trains_a_missing_one_and_keeps_the_rest(
    eval_files, tmp_path
):
    assert _compare(*_grid_args(eval_files)).exit_code == 0
    out = tmp_path / "cmp"
    kept, interrupted, missing = (
        out / "runs" / "sft-lr0.001-seed42",
        out / "runs" / "sft-lr0.003-seed42",
        out / "runs" / "minorsft-lr0.003-seed42",
    )
    kept_stamp = (kept / "run.json").stat().st_mtime_ns
    # as a run stopped after its first step leaves it: status interrupted, checkpoint step-1
    record = json.loads((interrupted / "run.json").read_text())
    record["status"] = "interrupted"
    (interrupted / "run.json").write_text(json.dumps(record))
    assert [p.name for p in (interrupted / "checkpoints").iterdir()] == ["step-1"]
    shutil.rmtree(interrupted / "final")
    (out / "evals" / interrupted.name / "results.json").unlink()
    shutil.rmtree(missing)
    shutil.rmtree(out / "evals" / missing.name)

    again = _compare(*_grid_args(eval_files), "--resume")
    assert again.exit_code == 0, again.output
    assert f"{interrupted.name}: resuming" in again.output
    assert f"{missing.name}: training" in again.output
    assert f"{kept.name}: training" not in again.output
    assert "the starting model: evaluating" not in again.output
    assert (kept / "run.json").stat().st_mtime_ns == kept_stamp
    resumed = json.loads((interrupted / "run.json").read_text())
    assert resumed["status"] == "completed" and (interrupted / "final").is_dir()
    table = json.loads((out / "results.json").read_text())["rows"]
    assert all(r["sets"] for r in table)


def test_resume_with_another_grid_is_refused_and_a_used_directory_without_it(eval_files, tmp_path):
    assert _compare(*_grid_args(eval_files)).exit_code == 0
    args = _grid_args(eval_files)
    args[args.index("1e-3,3e-3")] = "1e-3"
    refused = _compare(*args, "--resume")
    assert refused.exit_code == 1
    assert "was started with other grid" in refused.output
    again = _compare(*_grid_args(eval_files))
    assert again.exit_code == 1 and "add --resume to continue it" in again.output
    # the same file names with other records: the table would mix figures of two sets
    sub, _ = eval_files
    sub.write_text(sub.read_text().replace("9 - 4 = 5.", "9 - 4 = 6."))
    changed = _compare(*_grid_args(eval_files), "--resume")
    assert changed.exit_code == 1 and "was started with other eval_sha256" in changed.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    other = _compare(*_grid_args(eval_files, out="mine"))
    assert other.exit_code == 1 and "is not empty" in other.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--objective", "sft,minorsfft"], "Did you mean 'minorsft'"),
        (["--set", "betta=0.1,0.2"], "Did you mean 'beta'"),
        (["--eval-reward", "additon"], "Did you mean 'addition'"),
        (["--eval", "sub"], "expected NAME=PATH"),
        (["--eval", "sub=missing.jsonl"], "missing.jsonl"),
        (["--set", "seed=1,2"], "give the seeds with --seeds"),
        (["--set", "beta=0.1,0.1"], "repeats a value"),
        (["--lr", "1e-3,fast"], "--lr 'fast': not a number"),
        (["--temperature", "0.5"], "samples no completions"),  # no on-policy run takes it
        (["--seed", "1.5"], "--seed '1.5': not an integer"),
        (["--set", "max_steps=1,3"], "--set max_steps: --max-steps is given too"),
    ],
)
def test_bad_grids_are_refused_before_anything_trains(change, message, tmp_path):
    args = ["--objective", "sft,minorsft", *STEPS, "--eval", f"sub={tmp_path / 'x.jsonl'}"]
    (tmp_path / "x.jsonl").write_text(json.dumps(_records(SUMS, "+")[0]) + "\n")
    args += ["--output-dir", "cmp"]
    for index in range(0, len(change), 2):
        flag, value = change[index], change[index + 1]
        if flag in args and flag not in ("--eval", "--set"):
            args[args.index(flag) + 1] = value
        elif flag == "--eval":
            args[args.index("--eval") + 1] = value
        else:
            args += [flag, value]
    result = _compare(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not (tmp_path / "cmp").exists()


# -- the Python API ------------------------------------------------------------------------------
def test_align_compare_takes_records_and_reward_functions(model_dir, sft_rows, tmp_path):
    seen = []

    def right_answer(completions, answer, **kwargs):
        seen.extend(align.completion_text(c) for c in completions)
        texts = [align.completion_text(c) for c in completions]
        return [float(str(a) in t) for t, a in zip(texts, answer, strict=True)]

    result = align.compare(
        ["sft", "ift"],
        model=str(model_dir),
        data=sft_rows,
        evals={"sub": _records(DIFFERENCES, "-"), "add": _records(SUMS, "+")},
        eval_rewards=[right_answer],
        grid={"lr": [1e-3]},
        seeds=2,
        max_steps=1,
        batch_size=2,
        data_workers=1,
        eval_max_tokens=4,
        output_dir=tmp_path / "api",
    )
    assert result.complete and result.plot is not None
    assert [r["run"] for r in result.rows][1:] == [
        "sft-seed42", "sft-seed43", "ift-seed42", "ift-seed43"
    ]  # fmt: skip
    assert len(seen) == 5 * 12  # the starting model and 4 runs, 6 + 6 prompts each
    assert (result.output_dir / "evals" / "data" / "sub.jsonl").exists()
    assert "right_answer" in result.rows[1]["sets"]["sub"]
    ift = json.loads((result.output_dir / "runs" / "ift-seed43" / "run.json").read_text())
    assert ift["seed"] == 43
    kept = (result.output_dir / "evals" / "data" / "sub.jsonl").read_text()
    with pytest.raises(ConfigError, match="was started with other eval_sha256"):
        align.compare(
            ["sft", "ift"], model=str(model_dir), data=sft_rows,
            evals={"sub": _records(DIFFERENCES[1:], "-"), "add": _records(SUMS, "+")},
            eval_rewards=[right_answer], grid={"lr": [1e-3]}, seeds=2, max_steps=1,
            batch_size=2, data_workers=1, eval_max_tokens=4, output_dir=tmp_path / "api",
            resume=True,
        )  # fmt: skip
    assert (result.output_dir / "evals" / "data" / "sub.jsonl").read_text() == kept
    # how many data workers load the batches is no part of the comparison (as on the CLI)
    again = align.compare(
        ["sft", "ift"], model=str(model_dir), data=sft_rows,
        evals={"sub": _records(DIFFERENCES, "-"), "add": _records(SUMS, "+")},
        eval_rewards=[right_answer], grid={"lr": [1e-3]}, seeds=2, max_steps=1,
        batch_size=2, data_workers=2, eval_max_tokens=4, output_dir=tmp_path / "api",
        resume=True,
    )  # fmt: skip
    assert again.complete and again.rows == result.rows


def test_align_compare_refuses_a_model_object(model_dir, sft_pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ConfigError, match="train in place"):
        align.compare(
            "sft", model=model, data=str(sft_pairs), evals={"a": str(sft_pairs)}, max_steps=1,
            output_dir=tmp_path / "x",
        )  # fmt: skip
    assert not os.path.exists(tmp_path / "x")


def test_a_run_another_process_holds_is_left_to_it(eval_files, tmp_path):
    """Two `align compare --resume` processes share a comparison: a run claimed by one is
    skipped by the other, which says so, tables the rest and exits 1 (not complete yet)."""
    from align.comparison.runner import claimed

    assert _compare(*_grid_args(eval_files)).exit_code == 0
    out = tmp_path / "cmp"
    held = "minorsft-lr0.001-seed42"
    shutil.rmtree(out / "runs" / held)
    shutil.rmtree(out / "evals" / held)
    with claimed(out, held) as mine:
        assert mine
        result = _compare(*_grid_args(eval_files), "--resume")
    assert result.exit_code == 1, result.output
    assert f"{held}: another process has it" in result.output
    assert not (out / "runs" / held).exists()
    rows = json.loads((out / "results.json").read_text())["rows"]
    row = next(r for r in rows if r["run"] == held)
    assert row["status"] == "running elsewhere" and row["sets"] is None
    assert "Some runs are not in the table yet" in result.output


# -- the evaluation alone --------------------------------------------------------------------------
def _evaluate_start(model_dir, path, rewards, max_tokens=4):
    from align.comparison.api import choose_eval_rewards
    from align.comparison.evaluate import EvalSet, EvalSettings, evaluate
    from align.options import TrainConfig

    chosen = choose_eval_rewards(get_registry(), rewards, "eval_rewards")
    settings = EvalSettings(
        max_length=64,
        truncation="right",
        max_completion_length=max_tokens,
        precision="no",
        trust_remote_code=False,
    )
    return evaluate(model_dir, [EvalSet("add", str(path))], chosen, settings, TrainConfig(), None)


def test_two_eval_rewards_reading_the_same_column_each_get_it_once(model_dir, eval_files):
    seen = []

    def echo_answer(completions, answer, **kwargs):
        seen.append(list(answer))
        return [0.0] * len(completions)

    found = _evaluate_start(model_dir, eval_files[1], ["addition", echo_answer])["add"]
    assert seen == [[a + b for a, b in SUMS]]
    assert "addition" in found and found["echo_answer"] == 0.0


def test_the_length_reward_reads_the_eval_answers_limit_not_the_runs(model_dir, eval_files):
    # An answer at --eval-max-tokens is -1 by DAPO's punishment with L_max = that limit; with
    # the run's max_completion_length (512) every short answer would be 0.
    found = _evaluate_start(model_dir, eval_files[1], ["length"], max_tokens=4)["add"]
    assert -1.0 <= found["length"] < -0.8


def test_align_compare_takes_section_and_objective_options_as_align_train_does(tmp_path):
    # lora=True with a grid over lora.r, and minorsft={...}: both as align.train takes them
    result = align.compare(
        "minorsft",
        lora=True,
        minorsft={"beta": 0.01},
        grid={"lora.r": [4, 8]},
        evals={"sub": _records(DIFFERENCES[:2], "-")},
        max_steps=1,
        data_workers=1,
        eval_every=100,
        output_dir=tmp_path / "api",
    )
    assert result.complete
    for r in (4, 8):
        run = json.loads(
            (result.output_dir / "runs" / f"minorsft-r{r}-seed42" / "run.json").read_text()
        )
        assert run["config"]["lora"]["enabled"] is True and run["config"]["lora"]["r"] == r
        assert run["config"]["minorsft"]["beta"] == 0.01


def test_align_compare_refuses_an_eval_set_of_no_records_before_writing(tmp_path):
    with pytest.raises(ConfigError, match=r"evals\['a'\] must be a path or a list of dicts"):
        align.compare("sft", evals={"a": ["not a record"]}, output_dir=tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


def test_align_compare_refuses_an_option_given_also_in_the_grid(tmp_path):
    with pytest.raises(ConfigError, match="'max_steps' given as an option and in grid="):
        align.compare(
            "sft", max_steps=2, grid={"max_steps": [1, 3]}, evals={"a": _records(SUMS, "+")},
            output_dir=tmp_path / "x",
        )  # fmt: skip
    assert not os.path.exists(tmp_path / "x")


def test_align_compare_names_an_unknown_option_as_its_keyword(tmp_path):
    with pytest.raises(ConfigError, match=r"^align.compare: betta: .*Did you mean 'beta'"):
        align.compare(
            ["sft", "minorsft"], betta=0.1, evals={"a": _records(SUMS, "+")},
            output_dir=tmp_path / "x",
        )  # fmt: skip
    assert not os.path.exists(tmp_path / "x")


def test_two_processes_writing_the_tables_at_once_both_succeed(tmp_path, monkeypatch):
    # Each process that finishes rewrites results.md, results.json and the plot: here a second
    # writer runs between the first one's temporary file and its rename.
    from align.comparison import report

    table = [
        {"run": "starting model", "sets": {"a": {"nll": 1.0}, "b": {"nll": 2.0}}},
        {"run": "x", "objective": "sft", "lr": 1e-3, "seed": 1, "status": "completed",
         "sets": {"a": {"nll": 0.5}, "b": {"nll": 2.5}}},
    ]  # fmt: skip
    real, seen, inside = os.replace, set(), []

    def replace(source, target):  # before each file's first rename, the other writer
        if not inside and os.path.basename(target) not in seen:
            seen.add(os.path.basename(target))
            inside.append(True)
            report.write_tables(tmp_path, table, ["a", "b"], [], {}, {})
            report.plot(tmp_path, table, ["a", "b"], [])
            inside.pop()
        return real(source, target)

    monkeypatch.setattr(os, "replace", replace)
    report.write_tables(tmp_path, table, ["a", "b"], [], {}, {})
    assert report.plot(tmp_path, table, ["a", "b"], []) is not None
    assert (tmp_path / "results.md").read_text().count("| x |") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kept-vs-learned.png", "results.json", "results.md"
    ]  # fmt: skip


def test_a_stopped_run_says_how_to_resume_the_comparison(eval_files, tmp_path, monkeypatch):
    from align.loop.stopping import RunStopped

    def stopped(spec, registry):  # what a run stopped by Ctrl-C after its first step raises
        run_dir = spec.config.output_dir
        raise RunStopped(
            f"SIGINT: stopped after step 1 of 2; checkpoint {run_dir}/checkpoints/step-1. "
            f"Resume with the same command and --resume (--output-dir {run_dir}).",
            exit_code=130,
            run_dir=run_dir,
        )

    monkeypatch.setattr("align.api.run", stopped)
    result = _compare(*_grid_args(eval_files))
    assert result.exit_code == 130
    assert "sft-lr0.001-seed42: SIGINT: stopped after step 1 of 2" in result.output
    assert "--resume (--output-dir cmp)" in result.output
    assert "--output-dir cmp/runs" not in result.output


def test_a_section_switch_is_an_axis(eval_files, tmp_path):
    sub, _ = eval_files
    result = _compare(
        "--objective", "sft", "--set", "lora=true,false", *STEPS,
        "--eval", f"sub={sub}", "--output-dir", "cmp",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name, enabled in (("sft-loraTrue-seed42", True), ("sft-loraFalse-seed42", False)):
        run = json.loads((tmp_path / "cmp" / "runs" / name / "run.json").read_text())
        assert run["config"]["lora"]["enabled"] is enabled


def test_the_steps_column_is_what_a_run_trained_not_its_plan():
    from align.comparison.grid import Cell
    from align.comparison.report import rows
    from align.comparison.runner import CellState

    failed = {"status": "failed", "total_steps": 150, "failed_at_step": 3, "failure": "nan"}
    stopped = {"status": "interrupted", "total_steps": 150, "stopped_at_step": 40}
    done = {"status": "completed", "total_steps": 150}
    states = [
        CellState(Cell("sft", (), seed), status, None, record)
        for seed, (status, record) in enumerate(
            [("failed", failed), ("interrupted", stopped), ("completed", done)]
        )
    ]
    assert [row["steps"] for row in rows(states, None)] == [2, 40, 150]


def test_set_values_in_exponent_notation_are_numbers():
    # yaml reads 1e-2 as a string: the table, results.json and the plot's order need 0.01
    from align.cli.compare import _scalar

    assert _scalar("1e-2", "beta=1e-2") == 0.01 and isinstance(_scalar("1e-2", "x"), float)
    assert _scalar("3E-4", "lr=3E-4") == 3e-4
    assert _scalar("0.1", "x") == 0.1 and _scalar("word", "x") == "word"


def test_resume_without_an_output_dir_asks_for_it(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps(_records(SUMS, "+")[0]) + "\n")
    result = _compare("--resume", *STEPS, "--eval", f"sub={tmp_path / 'x.jsonl'}")
    assert result.exit_code == 1
    assert "--resume continues the comparison in --output-dir DIR: give it" in result.output
    with pytest.raises(ConfigError, match="resume=True continues the comparison in output_dir"):
        align.compare("sft", evals={"a": _records(SUMS, "+")}, resume=True)
    assert not (tmp_path / "runs").exists()


def test_the_config_files_seed_is_the_first_seed(eval_files, tmp_path):
    sub, _ = eval_files
    (tmp_path / "run.yaml").write_text("seed: 7\n")
    result = _compare(
        "--objective", "sft", "--seeds", "2", "--config", "run.yaml", *STEPS,
        "--eval", f"sub={sub}", "--output-dir", "cmp",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for seed in (7, 8):
        run = json.loads((tmp_path / "cmp" / "runs" / f"sft-seed{seed}" / "run.json").read_text())
        assert run["config"]["seed"] == seed
