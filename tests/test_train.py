"""End-to-end runs through the CLI on a tiny model directory and data the user brings."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import align
from align import plugins
from align.cli import cli
from align.data.examples import tokenize_records
from align.data.records import read_records


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *args])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def _user(model_dir, data):
    return ["--model", str(model_dir), "--data", str(data)]


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.fixture
def data(tmp_path, write_jsonl, sft_rows):
    return write_jsonl(tmp_path / "train.jsonl", sft_rows)


def test_sft_run_on_a_user_model_and_data(tmp_path, model_dir, data, write_jsonl, sft_rows):
    eval_data = write_jsonl(tmp_path / "eval.jsonl", sft_rows[:3])
    out = tmp_path / "out"
    _run(
        "--objective",
        "sft",
        *_user(model_dir, data),
        "--eval-data",
        str(eval_data),
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--save-every",
        "3",
        "--eval-every",
        "3",
        "--output-dir",
        str(out),
    )
    train, evals = _metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for row in train:
        assert {
            "step",
            "epoch",
            "loss",
            "learning_rate",
            "grad_norm",
            "num_tokens",
            "mean_token_accuracy",
        } <= row.keys()
    tokens_per_epoch = sum(len(e["input_ids"]) for e in _examples(model_dir, data)[0])
    assert train[1]["num_tokens"] == tokens_per_epoch  # cumulative, non-pad: 2 steps = 1 epoch
    assert train[-1]["num_tokens"] == 3 * tokens_per_epoch
    assert [r["step"] for r in evals] == [3, 6]

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert (out / "final" / "model.safetensors").exists()
    assert not list(out.rglob(".*tmp*"))
    # Weights only as safetensors; the optimizer's state (checkpoints/*/state/) loads with
    # torch.load(weights_only=True).
    assert [p.name for p in out.rglob("*.bin")] == ["optimizer.bin"]
    for name in ("optimizer.bin", "scheduler.pt"):
        torch.load(out / "checkpoints" / "step-3" / "state" / name, weights_only=True)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(model.model.embed_tokens.weight, start.model.embed_tokens.weight)
    assert (out / "checkpoints" / "step-3" / "model.safetensors").exists()

    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard, when installed
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["seed"] == 42
    assert "align-plugin-sft==0.1.0" in info["requirements"]
    assert any(r.startswith("align-core==") for r in info["requirements"])
    assert info["data"]["train"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert info["config"]["sft"] == {"normalization": "token"}
    assert info["config"]["max_steps"] == 6


def _examples(model_dir, data):
    """The examples a run with default settings trains on, tokenised independently."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenize_records(
        read_records(data), "prompt_completion", tokenizer, 1024, "keep_start", "train"
    )


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_step_one_logs_the_loss_before_any_update(tmp_path, model_dir, data, normalization):
    out = tmp_path / "out"
    _run(
        *_user(model_dir, data),
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--set",
        f"normalization={normalization}",
        "--output-dir",
        str(out),
    )
    train, _ = _metrics(out)
    examples, _ = _examples(model_dir, data)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    per_seq = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        mask = torch.tensor(ex["completion_mask"][1:], dtype=torch.float)
        per_seq.append(((nll * mask).sum(), mask.sum()))
    if normalization == "token":
        expected = sum(s for s, _ in per_seq) / sum(n for _, n in per_seq)
    else:
        expected = sum(s / n for s, n in per_seq) / len(per_seq)
    assert train[0]["loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert train[1]["loss"] < train[0]["loss"]


def test_demo_run_learns(tmp_path):
    out = tmp_path / "demo"
    result = _run("--max-steps", "80", "--eval-every", "40", "--output-dir", str(out))
    assert "embedded demo" in result.output and str(out / "final") in result.output
    train, evals = _metrics(out)
    assert train[0]["loss"] > 5.5  # ≈ ln(vocabulary) before training
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert evals[-1]["eval_loss"] < 0.5 * train[0]["loss"]
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["lr"] == 3e-3 and info["config"]["max_steps"] == 80


def test_an_existing_run_is_not_overwritten_without_asking(tmp_path, model_dir, data):
    out = tmp_path / "out"
    args = [
        *_user(model_dir, data),
        "--max-steps",
        "1",
        "--output-dir",
        str(out),
    ]
    _run(*args)
    result = _run(*args, expect=1)
    assert "already holds a run" in result.output and "--overwrite" in result.output
    # --overwrite clears the old run only once the new one is set up: a typo costs nothing.
    typo = [*_user(model_dir, data.with_name("typo.jsonl")), *args[4:], "--overwrite"]
    result = _run(*typo, expect=1)
    assert "typo.jsonl: no such file or directory" in result.output
    assert (out / "final" / "model.safetensors").exists() and len(_metrics(out)[0]) == 1
    _run(*args, "--overwrite")
    assert len(_metrics(out)[0]) == 1


def test_bf16_and_gradient_checkpointing(tmp_path, model_dir, data):
    out = tmp_path / "out"
    _run(
        *_user(model_dir, data),
        "--max-steps",
        "2",
        "--precision",
        "bf16",
        "--gradient-checkpointing",
        "--output-dir",
        str(out),
    )
    train, _ = _metrics(out)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--precision", "fp16"], "fp16 needs a CUDA GPU"),
        (["--model", "/nonexistent/model"], "--data is required"),
        (["--data", "x.jsonl"], "--model is required"),
        (["--objective", "dpo"], "pip install align-plugin-dpo"),
        (["--set", "normalisation=token"], "Did you mean 'normalization'?"),
    ],
)
def test_clear_errors(tmp_path, args, message, monkeypatch):
    if torch.cuda.is_available() and "fp16" in args:
        pytest.skip("fp16 is allowed with a GPU")
    monkeypatch.setenv(plugins.PLUGINS_ENV, "align-plugin-sft")  # dpo: a plugin not installed
    result = _run(*args, "--output-dir", str(tmp_path / "o"), expect=1)
    assert message in result.output and "Traceback" not in result.output


def test_bad_model_directory(tmp_path, data):
    result = _run(
        "--model", str(tmp_path), "--data", str(data), "--output-dir", str(tmp_path / "o"), expect=1
    )
    assert "cannot load model" in result.output


class ReferenceProbe:
    """An objective that declares needs_reference and reports what the reference returns."""

    __name__ = "reference-probe"

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="probe", description="test", needs_reference=True))

    @align.hookimpl
    def align_compute_loss(self, model, batch, reference):
        policy = align.forward_logps(model, batch)
        ref = reference.sequence_logps(batch)
        return align.LossOutput(
            loss=-policy.sums.sum(),
            count=len(ref),
            metrics={
                "ref_logp": (ref.sum(), len(ref)),
                "policy_logp": (policy.sums.sum().detach(), len(ref)),
            },
        )


def test_reference_is_the_frozen_starting_model(tmp_path, model_dir, data):
    plugins.reset_registry(plugins.load_plugins(extra=[ReferenceProbe()]))
    out = tmp_path / "out"
    _run(
        "--objective",
        "probe",
        *_user(model_dir, data),
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--output-dir",
        str(out),
    )
    train, _ = _metrics(out)
    assert train[0]["ref_logp"] == pytest.approx(train[0]["policy_logp"], abs=1e-4)
    for row in train[1:]:  # the batch is the whole data set, so only the policy may move
        assert row["ref_logp"] == pytest.approx(train[0]["ref_logp"], abs=1e-4)
        assert row["policy_logp"] > train[0]["policy_logp"] + 0.1


def test_bad_data_is_reported_through_the_cli(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\n')
    result = _run(*_user(model_dir, bad), "--output-dir", str(tmp_path / "o"), expect=1)
    assert f"{bad}, line 2, field 'completion': missing field" in result.output
    assert "Traceback" not in result.output


def test_precision_from_an_accelerate_config(tmp_path, model_dir, data, monkeypatch):
    """`accelerate launch` with mixed_precision in its config: used when --precision is not
    given, and a disagreement is an error rather than a silent choice."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "out"
    _run(*_user(model_dir, data), "--max-steps", "1", "--output-dir", str(out))
    assert json.loads((out / "run.json").read_text())["config"]["precision"] == "bf16"
    result = _run(
        *_user(model_dir, data), "--precision", "no", "--output-dir", str(tmp_path / "o"), expect=1
    )
    assert "--precision no, but the Accelerate config sets mixed_precision bf16" in result.output


def test_an_output_directory_that_cannot_be_written_is_refused(tmp_path, model_dir, data):
    """Refused before anything is loaded (a file where a directory should be: the tests run
    as root, for whom permission bits do not stop a write)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _run(*_user(model_dir, data), "--output-dir", str(blocker / "run"), expect=1)
    assert f"output directory {blocker / 'run'} is not writable" in result.output
    assert "Traceback" not in result.output
