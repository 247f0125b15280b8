"""align.train, the Python API: every kind of input it takes (paths, records in memory, a
datasets.Dataset, model and tokenizer objects, Python reward functions), its errors (raised,
never an exit), its result, the CLI's run being the same code path, and signal handling that
suits a notebook (no handlers outside the main thread, the previous ones always restored,
Ctrl-C stopping with a checkpoint)."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from click.testing import CliRunner

import align
from align.api import resolve_call
from align.cli import cli
from align.data.memory import InMemoryData
from align.data.sources import parse_sources
from align.errors import ConfigError
from align.loop.stopping import RunStopped

PAIRS = [
    {"prompt": f"What is {a} + {b}? ", "chosen": f"{a + b}.", "rejected": f"{a + b + 1}."}
    for a, b in [(1, 2), (10, 20), (3, 4), (7, 30), (12, 1), (5, 5), (40, 2), (8, 9)]
]
PROMPTS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": a + b}
    for a, b in [(1, 2), (10, 20), (3, 4), (7, 30)]
]
TINY = {"max_steps": 2, "batch_size": 4, "data_workers": 1}
GRPO = {"max_steps": 1, "batch_size": 4, "max_completion_length": 4, "data_workers": 1}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, model):
    after = model.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k].to(v.device))]


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- inputs ----------------------------------------------------------------------------------
def test_a_data_file_trains_and_returns_the_run(model_dir, tmp_path, write_jsonl, sft_rows):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "train.jsonl", sft_rows)
    result = align.train("sft", model=str(model_dir), data=data, output_dir="out", **TINY)
    assert isinstance(result, align.TrainResult)
    assert result.run_dir.is_absolute() and result.run_dir.resolve() == (tmp_path / "out").resolve()
    assert result.final_dir == result.run_dir / "final" and result.final_dir.is_dir()
    last = _rows(result.run_dir)[-1]
    assert result.metrics["step"] == 2 and result.metrics["loss"] == last["loss"]
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert _changed(_weights(start), result.model)  # trained: the weights moved
    assert not result.model.training  # handed back in eval mode
    assert result.tokenizer.pad_token_id is not None
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["status"] == "completed" and "in_memory" not in info["config"]


def test_records_in_a_list_train_sft_and_dpo(model_dir, sft_rows):
    sft = align.train("sft", model=model_dir, data=sft_rows, output_dir="sft", **TINY)
    assert sft.metrics["step"] == 2 and sft.metrics["loss"] > 0
    dpo = align.train(
        "dpo", model=model_dir, data=PAIRS, eval_data=PAIRS[:4], beta=0.3, output_dir="dpo", **TINY
    )
    assert "rewards/margins" in dpo.metrics and "eval_loss" in dpo.metrics
    info = json.loads((dpo.run_dir / "run.json").read_text())
    assert info["config"]["dpo"]["beta"] == 0.3
    assert info["config"]["in_memory"] == {
        "data": "a list of 8 records",
        "eval_data": "a list of 4 records",
    }
    assert info["data"]["train"]["sha256"].startswith("memory:records:")
    assert info["data"]["train"]["records"] == 8
    assert not (dpo.run_dir.parent / "data").exists()  # nothing written beside the run


def test_a_datasets_dataset_trains(model_dir, sft_rows):
    import datasets

    result = align.train(
        "sft", model=model_dir, data=datasets.Dataset.from_list(sft_rows), output_dir="o", **TINY
    )
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["config"]["in_memory"]["data"] == "a datasets.Dataset of 8 rows"
    assert info["data"]["train"]["examples"] == 8


def test_a_mixture_of_a_file_and_a_dataset(model_dir, tmp_path, write_jsonl, sft_rows):
    import datasets

    path = write_jsonl(tmp_path / "a.jsonl", sft_rows[:4])
    mixed = [path, datasets.Dataset.from_list(sft_rows[4:])]
    result = align.train("sft", model=model_dir, data=mixed, output_dir="o", **TINY)
    sources = json.loads((result.run_dir / "run.json").read_text())["data"]["train"]["sources"]
    assert [s["path"] for s in sources] == [str(path), "data[1]"]
    assert [s["examples"] for s in sources] == [4, 4]


def test_model_and_tokenizer_objects_are_used_not_reloaded(model_dir, sft_rows, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None  # align's copy gets one; the caller's object stays as it was
    before = _weights(model)

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded from disk")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_loading)
    result = align.train("sft", model=model, tokenizer=tokenizer, data=sft_rows, **TINY)
    assert result.model is model  # trained in place, as TRL's trainers do
    assert _changed(before, model)
    assert tokenizer.pad_token is None and result.tokenizer.pad_token is not None
    config = json.loads((result.run_dir / "run.json").read_text())["config"]
    assert config["model"] == str(model_dir)  # its name_or_path
    assert config["in_memory"]["model"] == {
        "class": "transformers.models.llama.modeling_llama.LlamaForCausalLM",
        "name_or_path": str(model_dir),
    }
    assert result.run_dir.parent.name == "runs"  # the CLI's default place


def test_an_in_memory_tokenizer_keys_the_data_cache_by_its_content(model_dir, sft_rows):
    """The cache key hashes the tokenizer's vocabulary, rules, special tokens and template, not
    a path: an object equal to the model's tokenizer finds the store the path-loaded run made;
    one with another chat template does not."""
    from transformers import AutoTokenizer

    first = align.train("sft", model=model_dir, data=sft_rows, output_dir="a", **TINY)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    again = align.train(
        "sft", model=model_dir, tokenizer=tokenizer, data=sft_rows, output_dir="b", **TINY
    )
    tokenizer.chat_template = "{{ messages }}"
    other = align.train(
        "sft", model=model_dir, tokenizer=tokenizer, data=sft_rows, output_dir="c", **TINY
    )
    stores = [
        json.loads((r.run_dir / "run.json").read_text())["data"]["train"]["sha256"]
        for r in (first, again, other)
    ]
    assert len(set(stores)) == 1  # the same records
    built = sorted(p.name for p in (first.run_dir.parent / "cache" / "data").iterdir())
    assert len(built) == 2  # two tokenizers, two stores: the equal object hit the first


def test_in_memory_records_fingerprint_their_content():
    rows = [{"prompt": "a", "completion": "b"}]
    same = InMemoryData("data", [{"completion": "b", "prompt": "a"}]).fingerprint()
    assert InMemoryData("data", rows).fingerprint() == same  # key order does not matter
    assert InMemoryData("x", [{"prompt": "a", "completion": "c"}]).fingerprint() != same


# -- rewards ---------------------------------------------------------------------------------
def test_a_python_reward_is_called_and_its_values_reach_the_metrics(model_dir):
    calls = []

    def constant(prompts, completions, answer: list[int], **kwargs):
        calls.append({"prompts": prompts, "completions": completions, "answer": answer, **kwargs})
        return [0.25] * len(completions)

    result = align.train("grpo", model=model_dir, data=PROMPTS, rewards=[constant], **GRPO)
    assert calls
    call = calls[0]
    count = len(call["completions"])
    assert count > 0 and len(call["prompts"]) == len(call["answer"]) == count
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in call["completions"])
    assert {p[0]["content"] for p in call["prompts"]} <= {
        p["prompt"][0]["content"] for p in PROMPTS
    }
    assert set(call["answer"]) <= {p["answer"] for p in PROMPTS}
    assert all(len(ids) <= 4 for ids in call["completion_ids"])
    assert call["config"].max_completion_length == 4
    assert result.metrics["reward"] == pytest.approx(0.25)
    assert result.metrics["rewards/constant/mean"] == pytest.approx(0.25)


def test_python_rewards_mix_with_registered_names_and_weights(model_dir):
    def half(completions, **kwargs):
        return [0.5 for _ in completions]

    result = align.train(
        "grpo",
        model=model_dir,
        data=PROMPTS,
        rewards=[half, "addition"],
        reward_weights=[2.0, 0.5],
        **GRPO,
    )
    metrics = result.metrics
    assert metrics["rewards/half/mean"] == pytest.approx(0.5)
    expected = 2.0 * 0.5 + 0.5 * metrics["rewards/addition/mean"]
    assert metrics["reward"] == pytest.approx(expected)
    reward = json.loads((result.run_dir / "run.json").read_text())["config"]["reward"]
    assert reward["half"] == {"weight": 2.0} and reward["addition"]["weight"] == 0.5
    both = align.train(
        "grpo", model=model_dir, data=PROMPTS, rewards=[half, "addition=0.5"], **GRPO
    )
    assert both.metrics["rewards/half/mean"] == pytest.approx(0.5)


def test_a_python_reward_is_checked_as_a_registered_one(model_dir):
    def wrong_count(completions):
        return [1.0]

    def not_finite(completions):
        return [float("nan")] * len(completions)

    with pytest.raises(align.PluginError, match=r"reward 'wrong_count' \(a Python function\)"):
        align.train("grpo", model=model_dir, data=PROMPTS, rewards=[wrong_count], **GRPO)
    with pytest.raises(align.PluginError, match=r"'not_finite'.*data\[\d\].*finite numbers"):
        align.train("grpo", model=model_dir, data=PROMPTS, rewards=[not_finite], **GRPO)


def test_a_column_a_python_reward_names_is_validated_in_every_record(model_dir):
    def needs(completions, keyword: list[str]):
        return [0.0] * len(completions)

    with pytest.raises(align.DataError, match=r"data\[0\], field 'keyword'"):
        align.train("grpo", model=model_dir, data=PROMPTS, rewards=[needs], **GRPO)


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lerning_rat": 1}, r"align.train: unknown option 'lerning_rat'\. Did you mean"),
        ({"max_step": 1}, r"unknown option 'max_step'\. Did you mean 'max_steps'\?"),
        ({"betta": 0.1}, r"unknown option 'betta'\. Did you mean 'beta'\?"),
        ({"beta": -1}, r"align.train: options of objective 'dpo': option 'beta'"),
        ({"options": {"betta": 1}}, r"unknown option 'betta'\. Did you mean 'beta'\?"),
        ({"lora": {"rr": 8}}, r"section 'lora': unknown option 'rr'\. Did you mean 'r'\?"),
        ({"lr": -1}, r"lr \(align.train\)|option 'lr'"),
        ({"num_processes": 2}, r"num_processes=2: align.train trains in this process"),
    ],
)
def test_bad_options_raise_config_errors(model_dir, options, message):
    with pytest.raises(align.ConfigError, match=message):
        align.train("dpo", model=model_dir, data=PAIRS, **options)


def test_input_errors_raise_and_name_what_was_given(model_dir, sft_rows):
    bad = [*PAIRS[:3], {"prompt": "p", "chosen": 3, "rejected": "r"}]
    with pytest.raises(align.DataError, match=r"^data\[3\], field 'chosen': expected a string"):
        align.train("dpo", model=model_dir, data=bad, **TINY)
    with pytest.raises(align.PluginError, match=r"align.train: unknown objective 'dop'\. Did you"):
        align.train("dop", model=model_dir, data=PAIRS)
    with pytest.raises(align.ConfigError, match=r"rewards \(align.train\): objective 'sft'"):
        align.train("sft", model=model_dir, data=sft_rows, rewards=[lambda completions: []])
    with pytest.raises(align.ConfigError, match=r"pick a split"):
        import datasets

        align.train(
            "sft",
            model=model_dir,
            data=datasets.DatasetDict(train=datasets.Dataset.from_list(sft_rows)),
        )
    with pytest.raises(align.ConfigError, match=r"^align.train: data is required when model"):
        align.train("sft", model=model_dir)
    with pytest.raises(align.ConfigError, match=r"model is required when data is given"):
        align.train("sft", data=sft_rows)
    with pytest.raises(align.ConfigError, match=r"model must be a hub id"):
        align.train("sft", model=object(), data=sft_rows)
    with pytest.raises(align.ConfigError, match=r"reward_weights has 1 weights for 2 rewards"):
        align.train(
            "grpo",
            model=model_dir,
            data=PROMPTS,
            rewards=["addition", "length"],
            reward_weights=[1],
        )
    assert not (model_dir.parent / "runs").exists() and not os.path.exists("runs")


def test_option_errors_come_before_torch_is_imported(model_dir, tmp_path):
    code = (
        "import sys, align\n"
        "for kwargs in ({'betta': 1}, {'data': 'missing.jsonl'}, {'num_processes': 2}):\n"
        "    try:\n"
        f"        align.train('dpo', **{{'model': {str(model_dir)!r}, 'data': [{{}}], **kwargs}})\n"
        "    except align.AlignError as exc:\n"
        "        print(type(exc).__name__, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.stdout.split() == ["ConfigError", "False", "DataError", "False"] + [
        "ConfigError",
        "False",
    ], done.stderr


# -- one code path with the CLI --------------------------------------------------------------
def test_the_cli_and_the_api_give_the_same_first_step(model_dir, tmp_path, write_jsonl):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = ["run", "--objective", "dpo", "--model", model_dir, "--data", data]
    args += ["--max-steps", "1", "--batch-size", "4", "--output-dir", tmp_path / "cli"]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    api = align.train("dpo", model=model_dir, data=PAIRS, max_steps=1, batch_size=4)
    (cli_row,), (api_row,) = _rows(tmp_path / "cli"), _rows(api.run_dir)
    assert cli_row["loss"] == api_row["loss"] and cli_row["grad_norm"] == api_row["grad_norm"]


def test_the_cli_runs_through_align_api_run(
    model_dir, tmp_path, write_jsonl, sft_rows, monkeypatch
):
    import align.api

    seen = []
    real = align.api.run
    monkeypatch.setattr(
        align.api, "run", lambda spec, registry: seen.append(spec) or real(spec, registry)
    )
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows)
    args = ["run", "--model", model_dir, "--data", data, "--max-steps", "1", "--output-dir", "o"]
    assert CliRunner().invoke(cli, list(map(str, args))).exit_code == 0
    assert len(seen) == 1 and seen[0].config.max_steps == 1


# -- notebooks: threads and signals ----------------------------------------------------------
def _handlers():
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def _before_each_step(monkeypatch, action):
    """Run ``action(step_number)`` at the start of every training step; returns the original
    ``Training.train_step`` (to put back)."""
    import align.loop.train as loop

    step = loop.Training.train_step

    def wrapped(self, number):
        action(number)
        return step(self, number)

    monkeypatch.setattr(loop.Training, "train_step", wrapped)
    return step


def _sigint_at_step_1(number):
    if number == 1:
        os.kill(os.getpid(), signal.SIGINT)


def test_from_a_thread_no_handler_is_installed(model_dir, sft_rows, monkeypatch):

    during, results = [], []
    _before_each_step(monkeypatch, lambda _: during.append(_handlers()))
    before = _handlers()
    thread = threading.Thread(
        target=lambda: results.append(align.train("sft", model=model_dir, data=sft_rows, **TINY))
    )
    thread.start()
    thread.join(120)
    assert results and results[0].metrics["step"] == 2
    assert during and all(d == before for d in during)
    assert _handlers() == before


def test_handlers_are_restored_after_a_run_and_after_a_failure(model_dir, sft_rows, monkeypatch):
    import align.loop.train as loop

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        during = []
        _before_each_step(monkeypatch, lambda _: during.append(signal.getsignal(signal.SIGTERM)))
        before = _handlers()
        align.train("sft", model=model_dir, data=sft_rows, **TINY)
        assert during and all(h is not mine for h in during)  # the run's own, while it ran
        assert _handlers() == before

        def fails(self, number):
            raise RuntimeError("boom")

        monkeypatch.setattr(loop.Training, "train_step", fails)
        with pytest.raises(RuntimeError, match="boom"):
            align.train("sft", model=model_dir, data=sft_rows, **TINY)
        assert _handlers() == before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_stops_with_a_checkpoint_and_resume_finishes(model_dir, sft_rows, monkeypatch):
    """A notebook's "interrupt kernel" is SIGINT: the run stops after the step, saves, and
    align.train raises RunStopped (no exit) saying how to resume; resume=True finishes it."""
    import align.loop.train as loop

    step = _before_each_step(monkeypatch, _sigint_at_step_1)
    before = _handlers()
    with pytest.raises(RunStopped, match=r"SIGINT: stopped after step 1 of 2") as stopped:
        align.train("sft", model=model_dir, data=sft_rows, output_dir="o", **TINY)
    assert "resume=True, output_dir='o'" in str(stopped.value)
    assert stopped.value.run_dir.name == "o" and (stopped.value.run_dir / "checkpoints").is_dir()
    assert _handlers() == before
    monkeypatch.setattr(loop.Training, "train_step", step)
    result = align.train("sft", model=model_dir, data=sft_rows, output_dir="o", resume=True, **TINY)
    assert result.metrics["step"] == 2
    assert json.loads((result.run_dir / "run.json").read_text())["status"] == "completed"


# -- the documentation's example -------------------------------------------------------------
def _reward_example(path):
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / path).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (block,) = [b for b in blocks if "def contains_keyword" in b and "align.train(" in b]
    return block


def test_the_documented_reward_function_runs_as_written(capsys):
    """CONTRIBUTING's plain-function reward is docs/python-api.md's, and it trains as shown
    (offline, on the demo model)."""
    code = _reward_example("CONTRIBUTING.md")
    assert code == _reward_example("docs/python-api.md")
    namespace = {}
    exec(compile(code, "CONTRIBUTING.md", "exec"), namespace)
    result = namespace["result"]
    assert result.metrics["step"] == 1 and "rewards/length/mean" in result.metrics
    value = result.metrics["rewards/contains_keyword/mean"]
    assert capsys.readouterr().out.splitlines()[-1] == str(value)
    assert align.RunStopped is RunStopped


def test_runs_in_one_process_start_afresh(model_dir, sft_rows):
    """A notebook trains again in the same process: another precision is not refused by
    Accelerate's process-wide state, and transformers' progress bars come back on."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()  # as in a fresh notebook (other tests' CLI runs)
    align.train("sft", model=model_dir, data=sft_rows, **TINY)
    assert transformers_logging.is_progress_bar_enabled()
    again = align.train("sft", model=model_dir, data=sft_rows, precision="bf16", **TINY)
    assert json.loads((again.run_dir / "run.json").read_text())["config"]["precision"] == "bf16"


def test_an_untyped_column_takes_the_type_a_registered_reward_declares(model_dir):
    """``answer`` unannotated here, a float for ``addition``: one field, validated as a float."""
    seen = []

    def echo(completions, answer, **kwargs):
        seen.extend(answer)
        return [0.0] * len(completions)

    align.train("grpo", model=model_dir, data=PROMPTS, rewards=[echo, "addition"], **GRPO)
    assert seen and all(isinstance(a, float) for a in seen)
    bad = [*PROMPTS[:3], {**PROMPTS[3], "answer": "seven"}]
    with pytest.raises(align.DataError, match=r"data\[3\], field 'answer': expected a number"):
        align.train("grpo", model=model_dir, data=bad, rewards=[echo, "addition"], **GRPO)


def test_a_model_objects_precomputed_reference_is_keyed_by_its_weights(model_dir):
    """No files name a model object's weights: the reference log-probs' cache key hashes them,
    so the same weights find the cache and changed ones (equal name_or_path) do not."""
    from transformers import AutoModelForCausalLM

    def reference_cache(model, out):
        result = align.train("dpo", model=model, data=PAIRS, output_dir=out, **TINY)
        info = json.loads((result.run_dir / "run.json").read_text())["reference"]
        return info["splits"]["train"]

    first = reference_cache(AutoModelForCausalLM.from_pretrained(model_dir), "a")
    same = reference_cache(AutoModelForCausalLM.from_pretrained(model_dir), "b")
    changed = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # one value mid-tensor: no sample of the values would see it
        weight = changed.model.layers[0].mlp.up_proj.weight
        weight.view(-1)[weight.numel() // 2] += 1.0
    other = reference_cache(changed, "c")
    assert not first["cache_hit"] and same["cache_hit"] and same["cache"] == first["cache"]
    assert not other["cache_hit"] and other["cache"] != first["cache"]


def test_a_model_object_run_resumes_exactly(model_dir, sft_rows, monkeypatch):
    """Stopped after step 1 and resumed with the model as loaded, a run given a model object
    ends with the weights of the run that was not stopped."""
    from transformers import AutoModelForCausalLM

    import align.loop.train as loop

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir)

    whole = align.train("sft", model=load(), data=sft_rows, output_dir="whole", **TINY)
    step = _before_each_step(monkeypatch, _sigint_at_step_1)
    with pytest.raises(RunStopped):
        align.train("sft", model=load(), data=sft_rows, output_dir="o", **TINY)
    monkeypatch.setattr(loop.Training, "train_step", step)
    with pytest.raises(align.ConfigError, match=r"in_memory: was"):  # not the run it continues
        align.train("sft", model=model_dir, data=sft_rows, output_dir="o", resume=True, **TINY)
    resumed = align.train("sft", model=load(), data=sft_rows, output_dir="o", resume=True, **TINY)
    assert resumed.metrics["loss"] == whole.metrics["loss"]
    assert not _changed(_weights(whole.model), resumed.model)


def test_lora_on_a_model_object_returns_the_model_with_its_adapter(model_dir, sft_rows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = align.train("sft", model=model, data=sft_rows, lora={"enabled": True, "r": 4}, **TINY)
    assert hasattr(result.model, "peft_config") and result.model.peft_config["default"].r == 4
    trained = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    switch = align.train("sft", model=model_dir, data=sft_rows, lora=True, output_dir="s", **TINY)
    assert hasattr(switch.model, "peft_config")


def test_trl_names_are_keywords_too_and_run_json_records_aligns(model_dir, sft_rows):
    """TRL's learning_rate= and per_device_train_batch_size= are align.train keywords, as they
    are flags of align run, recorded under align's names."""
    result = align.train(
        "sft",
        model_name_or_path=model_dir,
        data=sft_rows,
        learning_rate=1e-3,
        per_device_train_batch_size=2,
        output_dir="trl-names",
        max_steps=1,
    )
    config = json.loads((result.run_dir / "run.json").read_text())["config"]
    assert (config["lr"], config["batch_size"]) == (1e-3, 2)
    assert "learning_rate" not in config and "per_device_train_batch_size" not in config
    with pytest.raises(ConfigError, match="learning_rate"):
        align.train("sft", model=model_dir, data=sft_rows, lr=1e-3, learning_rate=1e-3)


def test_review_edge_cases_of_the_arguments(model_dir, sft_rows, tmp_path, monkeypatch):
    """A folder named like a split is a folder; TRL's argument names are the arguments; a
    weight, or an objective option, given twice or in the wrong shape is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # a dataset folder called data/, next to records in memory
    spec = resolve_call(
        align.api.load_registry(),
        objective="sft",
        model=model_dir,
        tokenizer=None,
        data=sft_rows,
        eval_data="data",
        rewards=None,
        reward_weights=None,
        options=None,
        kwargs={},
    )
    sources = parse_sources(spec.config.eval_data, "test", None, None, {}, spec.given.data)
    assert [s.in_memory for s in sources] == [None]  # the folder, not the training records
    demo = resolve_call(
        align.api.load_registry(), objective="sft", model=None, tokenizer=None, data=None,
        eval_data=None, rewards=None, reward_weights=None, options=None,
        kwargs={"model_name_or_path": "demo", "dataset_name": sft_rows},
    )  # fmt: skip
    assert demo.config.model == "demo" and demo.given.data
    with pytest.raises(ConfigError, match="reward_weights must be a list"):
        align.train("grpo", model=model_dir, data=PROMPTS, rewards=[len], reward_weights=0.5)
    with pytest.raises(ConfigError, match="'beta' given"):
        align.train("dpo", model=model_dir, data=PAIRS, beta=0.2, options={"beta": 0.1})
    with pytest.raises(ConfigError, match="'beta' given in dpo="):
        align.train("dpo", model=model_dir, data=PAIRS, beta=0.2, dpo={"beta": 0.3})
    with pytest.raises(ConfigError, match="model and model_name_or_path both given"):
        align.train("sft", model=model_dir, model_name_or_path=model_dir, data=sft_rows)


def test_a_model_carrying_an_adapter_is_refused_a_second_one(model_dir, sft_rows):
    first = align.train("lora-sft", model=model_dir, data=sft_rows, output_dir="one", **TINY)
    with pytest.raises(ConfigError, match="already carries a PEFT adapter"):
        align.train("sft", model=first.model, tokenizer=first.tokenizer, data=sft_rows, lora=True)


def test_records_in_memory_are_named_as_python_names_them(sft_rows, capsys):
    """The log and run.json call records in memory `data`, never the label they are held by."""
    result = align.train("sft", model="demo", data=sft_rows, output_dir="named", max_steps=1)
    err = capsys.readouterr().err
    assert "Training the embedded demo model" in err and ") on data.\n" in err
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["data"]["train"]["path"] == "data"
    assert "<in memory" not in (result.run_dir / "train.log").read_text()


def test_held_out_reward_is_the_mean_over_every_completion_not_of_batch_means(model_dir):
    """Eval rounds of unequal size (3 held-out prompts in micro-batches of 2 and 1) count by
    their completions: a mean of the two batch means would give 0.5 here, not 1/3."""

    def third_prompt_only(completions, answer: list[int], **kwargs):
        return [float(a == 7) for a in answer]

    held_out = [dict(p, answer=a) for p, a in zip(PROMPTS, (1, 2, 7), strict=False)]
    result = align.train(
        "grpo",
        model=model_dir,
        data=PROMPTS,
        eval_data=held_out,
        rewards=[third_prompt_only],
        **{**GRPO, "batch_size": 2},
    )
    assert result.metrics["eval_reward"] == pytest.approx(1 / 3)
    assert result.metrics["eval_rewards/third_prompt_only/mean"] == pytest.approx(1 / 3)
