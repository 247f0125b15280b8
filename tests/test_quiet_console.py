"""A quiet console: third-party messages that tell the user nothing are dropped at their source
(and nothing else is), internal details go to RUN_DIR/train.log and the console with
--verbose, and on-policy progress bars show the mean reward."""

import json
import logging
import shutil
import subprocess
import sys
import warnings

import pytest
from test_run_failures import _run  # align run ARGS, its exit status checked

from align.loop import quiet
from align.loop.metrics import format_value
from align.loop.runlog import LOG_FILE

DEEPSPEED_NOTICE = "Setting accelerator to CPU"
LOG_PROBS = "log-probs: "


@pytest.fixture
def base(tmp_path, model_dir, write_jsonl, sft_rows):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    return ["--model", model_dir, "--data", data, "--batch-size", "4", "--max-steps", "2"]


# -- the filters: exactly their messages ---------------------------------------------------------
def test_the_filters_add_only_their_own_entries_and_other_warnings_still_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        quiet.quiet_third_party()
        quiet.quiet_third_party()  # again (every run sets up): no second copy
        added = [f for f in warnings.filters if f not in before]
        assert [(f[0], f[1].pattern, f[2], f[3].pattern) for f in added] == [
            ("ignore", message, category, module)
            for message, category, module in reversed(quiet.IGNORED_WARNINGS)
        ]
        text = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
        source = "transformers.modeling_utils"
        warnings.warn_explicit(text, FutureWarning, "modeling_utils.py", 1, source)
        warnings.warn_explicit(text, FutureWarning, "mine.py", 1, "mine")  # another module's
        warnings.warn_explicit("other", FutureWarning, "m.py", 1, source)
        warnings.warn("a plugin's own warning", UserWarning, stacklevel=1)
    shown = [(str(w.message), w.filename) for w in caught]
    assert shown == [
        (text, "mine.py"),
        ("other", "m.py"),
        ("a plugin's own warning", __file__),
    ]


def test_deepspeeds_cpu_notice_is_dropped_and_its_other_records_kept():
    quiet.quiet_third_party()
    quiet.quiet_third_party()
    logger = logging.getLogger("DeepSpeed")
    assert sum(isinstance(f, quiet.DropMessage) for f in logger.filters) == 1
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning(
            "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable "
            "to detect it."
        )
        logger.warning("ZeRO stage 3: a real warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["ZeRO stage 3: a real warning"]


def test_a_lora_run_shows_no_is_gradient_checkpointing_warning(tmp_path, base, recwarn):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base[1])
    with warnings.catch_warnings(record=True) as caught:  # PEFT asks transformers for it
        warnings.simplefilter("always")
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert any("is_gradient_checkpointing" in str(w.message) for w in caught), (
        "PEFT no longer raises it: the filter in align.loop.quiet can go"
    )
    recwarn.clear()
    result = _run(*base, "--lora", "--output-dir", tmp_path / "out")
    assert "is_gradient_checkpointing" not in result.output
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]


def test_a_run_prints_no_deepspeed_notice(tmp_path, base):
    """A run as a user starts it, with DeepSpeed installed (the test extras): saving the model,
    Accelerate imports DeepSpeed, which logs the notice on stdout where it finds no GPU."""
    pytest.importorskip("deepspeed")
    command = [sys.executable, "-m", "align.cli", "run", *map(str, base)]
    done = subprocess.run(
        [*command, "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout + done.stderr
    assert DEEPSPEED_NOTICE not in printed
    assert "Warning" not in printed and "warn(" not in printed, printed
    assert LOG_PROBS not in printed
    assert LOG_PROBS in (tmp_path / "out" / LOG_FILE).read_text()


# -- internal details: train.log, and the console with --verbose ----------------------------------
def test_internal_details_go_to_train_log_and_to_the_console_with_verbose(tmp_path, base):
    out = tmp_path / "out"
    quiet_run = _run(*base, "--output-dir", out)
    assert LOG_PROBS not in quiet_run.stderr and "data train: tokenised" not in quiet_run.stderr
    assert "Training sft (" in quiet_run.stderr and "data train: 8 records" in quiet_run.stderr
    log = (out / LOG_FILE).read_text()
    for line in quiet_run.stderr.splitlines():  # every line the user read, but the bar's
        if "|" not in line and line.strip():
            assert line in log, line
    assert LOG_PROBS in log and "data train: tokenised" in log
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert f"step 2: loss {format_value(rows[-1]['loss'])}" in log  # each logged step
    assert json.loads((out / "run.json").read_text())["owns"].count(LOG_FILE) == 1

    loud = _run(*base, "--output-dir", out, "--overwrite", "--verbose")
    assert LOG_PROBS in loud.stderr and "data train: tokenised" in loud.stderr
    assert (out / LOG_FILE).read_text().count("Training sft (") == 1  # the old run's went


def test_a_resumed_run_appends_to_its_log(tmp_path, base):
    out = tmp_path / "out"
    args = [*base[:-1], "4", "--save-every", "2", "--output-dir", out]
    _run(*args)
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "status": "running"}))
    shutil.rmtree(out / "final")
    _run(*args, "--resume")
    log = (out / LOG_FILE).read_text()
    assert log.count("Training sft (") == 2 and "Resuming at step 2 of 4" in log


def test_the_reason_a_run_stopped_is_in_its_log(tmp_path, poisoned_model_dir, write_jsonl):
    rows = [{"prompt": "What is ~? ", "completion": "A tilde."}]  # a NaN loss at step 1
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    result = _run("--model", poisoned_model_dir, "--data", data, "--output-dir", out, expect=1)
    log = (out / LOG_FILE).read_text()
    assert "step 1: the loss is nan (not finite)" in result.output
    assert "step 1: the loss is nan (not finite)" in log


# -- the reward on the progress bar ---------------------------------------------------------------
@pytest.mark.parametrize("objective", ["grpo", "online-dpo"])
def test_on_policy_progress_bars_show_the_mean_reward(tmp_path, model_dir, write_jsonl, objective):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": a + b} for a, b in [(1, 2), (3, 4)]]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    args = ["--objective", objective, "--model", model_dir, "--data", data, "--batch-size", "2"]
    args += ["--reward", "addition", "--reward", "length", "--max-completion-length", "4"]
    result = _run(*args, "--max-steps", "2", "--output-dir", out)
    logged = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    last = logged[-1]
    bar = result.stderr.rsplit("\r", 1)[-1]  # the bar as the run left it
    assert f"loss={format_value(last['loss'])}, reward={format_value(last['reward'])}" in bar


def test_an_off_policy_progress_bar_has_no_reward(tmp_path, base):
    result = _run(*base, "--output-dir", tmp_path / "out")
    assert "loss=" in result.stderr and "reward=" not in result.stderr
