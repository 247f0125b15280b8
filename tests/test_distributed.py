"""Data-parallel training on CPU (gloo, two processes through torchrun) equals one process
with the combined batch: losses, gradients and metrics are reduced over processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from align.cli import cli
from align.loop.metrics import MetricSums

# torchrun picks free ports for its rendezvous; two launches at once on the xdist workers can
# race for one, so every test here runs on the same worker (pytest's --dist loadgroup).
pytestmark = pytest.mark.xdist_group("torchrun")


def _torchrun(*args):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*cmd, *map(str, args)], env=env, timeout=300, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _align_run(*args, env=None):
    """``align run --num-processes 2 …``: align launches the processes itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "align.cli", *map(str, args), "--num-processes", "2"]
    return subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)


def _one_and_two_processes(tmp_path, common, monkeypatch, launcher="torchrun"):
    """``align run`` with batch 2 on two processes and batch 4 on one, each with its own
    cache (so neither reads the other's precomputed values); both metrics logs. The two
    processes are started by torchrun, or by ``align run --num-processes 2``."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache-two"))
    two = [*common, "--batch-size", "2", "--output-dir", tmp_path / "two"]
    if launcher == "torchrun":
        _torchrun("-m", "align.cli", *two)
    else:
        result = _align_run(*two)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "on 2 process(es)" in result.stderr
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache-one"))
    result = CliRunner().invoke(
        cli, [*map(str, common), "--batch-size", "4", "--output-dir", str(tmp_path / "one")]
    )
    assert result.exit_code == 0, result.output

    def rows(name):
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    return rows("one"), rows("two")


def _assert_same_final_weights(tmp_path, lr=1e-2):
    """The final weights agree to lr/100: the two set-ups sum gradients in another order, and
    Adam divides each coordinate's step by its own scale, so a float difference in a gradient
    near zero becomes a visible (but tiny) difference in that weight's step."""
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert torch.allclose(value, two[name], atol=lr / 100, rtol=0), name


def test_two_processes_equal_one_large_batch(tmp_path, model_dir, write_jsonl, sft_rows):
    """Two gloo processes with 4 examples each: the same loss and gradients as one batch of 8."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    _torchrun(Path(__file__).with_name("distributed_worker.py"), model_dir, tmp_path, data)
    reduced = json.loads((tmp_path / "metrics.json").read_text())
    assert reduced["uneven"] == pytest.approx(1.0)  # (3 + 1) / (1 + 3)
    assert reduced["only_rank1"] == pytest.approx(1.0)  # names are gathered from every process

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align import default_batch
    from align.data.examples import tokenize_records
    from align.data.records import read_records
    from align.loop.step import accumulate_gradients
    from align_sft.loss import sft_counts, sft_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_records(
        read_records(data), "prompt_completion", tokenizer, 64, "error", "train"
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = default_batch("prompt_completion", examples, tokenizer.pad_token_id)
    loss = accumulate_gradients(
        model,
        [(batch, sft_counts(batch, "token"))],
        lambda b: (sft_loss(model, b, "token"), {}),
        Accelerator(cpu=True),
        MetricSums(),
    )
    assert reduced["step_loss"] == pytest.approx(loss, abs=1e-5)
    assert reduced["logged_loss"] == pytest.approx(loss, abs=1e-5)
    two = load_file(str(tmp_path / "grads.safetensors"))
    one = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert two.keys() == one.keys()
    for name, grad in one.items():
        assert torch.allclose(two[name], grad, atol=1e-5, rtol=0), name


def test_two_process_run_equals_one_process_run(
    tmp_path, model_dir, write_jsonl, sft_rows, monkeypatch
):
    """Ten examples (3 steps an epoch, the last a 2-example batch) and a 3-example eval split
    that does not divide evenly: no example is repeated or dropped in either run."""
    extra = [
        {"prompt": "What is 9 + 9? ", "completion": "18."},
        {"prompt": "Hi ", "completion": "Hello."},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows + extra)
    eval_data = write_jsonl(tmp_path / "e.jsonl", sft_rows[:3])
    common = [
        "run",
        "--model",
        model_dir,
        "--data",
        data,
        "--eval-data",
        eval_data,
        "--eval-every",
        "2",
        "--max-steps",
        "4",
        "--lr",
        "1e-2",
    ]
    one, two = _one_and_two_processes(tmp_path, common, monkeypatch, launcher="align")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 2, 3, 4, 4]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "eval_loss", "mean_token_accuracy", "eval_mean_token_accuracy"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key
        if "grad_norm" in a:
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert (a.get("epoch"), a.get("num_tokens")) == (b.get("epoch"), b.get("num_tokens"))
    assert one[3]["epoch"] == 1.0  # 3 steps an epoch in both runs
    _assert_same_final_weights(tmp_path)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["num_processes"] == 2


@pytest.mark.parametrize("mode", ["precomputed", "model"])
def test_kto_reference_point_spans_processes(tmp_path, model_dir, write_jsonl, mode, monkeypatch):
    """KTO's z0 is taken over every process's mismatched pairs, and the precomputed pass is
    shared out and gathered: two processes with batch 2 equal one with batch 4."""
    rows = [
        {
            "prompt": f"What is {a} + 1? ",
            "completion": f"{a + 1}." if a % 2 else "No.",
            "label": a % 2 == 1,
        }
        for a in range(10)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    eval_data = write_jsonl(tmp_path / "e.jsonl", rows[:3])
    common = ["run", "--objective", "kto", "--model", model_dir, "--data", data]
    common += f"--eval-data {eval_data} --eval-every 2 --max-steps 4 --lr 1e-2".split()
    common += ["--reference", mode]
    one, two = _one_and_two_processes(tmp_path, common, monkeypatch)
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {
            "learning_rate",
            "grad_norm",
            "step",
            "epoch",
            "num_tokens",
            "num_tokens_computed",
        }:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert any(r.get("kl", 0) > 0 for r in one)  # z0 moves off its clamp, so it is compared
    for name in ("one", "two"):
        reference = json.loads((tmp_path / name / "run.json").read_text())["reference"]
        assert not any(split["cache_hit"] for split in reference.get("splits", {}).values())


def test_ift_with_untied_embeddings_on_two_processes(
    tmp_path, untied_model_dir, write_jsonl, sft_rows, monkeypatch
):
    """IFT's input table gets no gradient; data parallelism must not trip over it."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    common = ["run", "--objective", "ift", "--model", untied_model_dir, "--data", data]
    common += ["--max-steps", "3", "--lr", "1e-2"]
    one, two = _one_and_two_processes(tmp_path, common, monkeypatch)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "nll", "sft_nll"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_dpo_on_two_processes_equals_one_process(tmp_path, model_dir, write_jsonl, monkeypatch):
    """DPO with a precomputed reference: the pass is shared out and gathered; the pairs'
    losses and reward metrics are reduced as sums and counts over processes."""
    rows = [
        {"prompt": f"What is {a} + 1? ", "chosen": f"{a + 1}.", "rejected": f"It is {a}."}
        for a in range(10)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    eval_data = write_jsonl(tmp_path / "e.jsonl", rows[:3])
    common = ["run", "--objective", "dpo", "--model", model_dir, "--data", data]
    common += f"--eval-data {eval_data} --eval-every 2 --max-steps 4 --lr 1e-2".split()
    one, two = _one_and_two_processes(tmp_path, common, monkeypatch, launcher="align")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 2, 3, 4, 4]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {
            "learning_rate",
            "step",
            "epoch",
            "num_tokens",
            "num_tokens_computed",
        }:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert one[-2]["rewards/margins"] > 0  # the policy moved, so the comparison means something
    _assert_same_final_weights(tmp_path)


def test_num_processes_refuses_another_world_size(tmp_path, model_dir, write_jsonl, sft_rows):
    """A launcher that started one process for a run that asked for two: refused before
    training. (Started without a launcher, align would start the two itself.)"""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["-m", "align.cli", "run", "--model", str(model_dir), "--data", str(data)]
    cmd += ["--num-processes", "2", "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode != 0
    assert "--num-processes 2, but the launcher started 1 process(es)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_processes_that_did_not_join_are_refused(tmp_path, model_dir, write_jsonl, sft_rows):
    """Two processes on CPU that Accelerate is told not to run on the CPU each run alone, as
    rank 0 (what `accelerate launch --multi_gpu` on a CPU machine used to give): refused."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    env = {**os.environ, "ACCELERATE_USE_CPU": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "align.cli", "run", "--model", str(model_dir), "--data", str(data)]
    cmd += ["--output-dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode != 0
    assert "the launcher started 2 processes (WORLD_SIZE), but Accelerate runs" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sigterm_stops_every_process_at_one_checkpoint(tmp_path, model_dir, write_jsonl, sft_rows):
    """SIGTERM to `align run --num-processes 2`: both processes stop after the same step and
    save one checkpoint (each its RNG state); --resume continues on two processes."""
    import signal
    import time

    from align.loop.resume import complete_checkpoints

    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    out = tmp_path / "out"
    args = ["run", "--model", model_dir, "--data", data, "--batch-size", "1", "--lr", "1e-2"]
    args += ["--max-steps", "60", "--output-dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "align.cli", *map(str, args), "--num-processes", "2"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    ((step, checkpoint),) = complete_checkpoints(out)
    assert step < 60 and "Resume with the same command and --resume" in stderr
    state = sorted(p.name for p in (checkpoint / "state").iterdir())
    assert state == ["optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.pt"]

    result = _align_run(*args, "--resume", env={"ALIGN_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming at step {step} of 60" in result.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 61))


def test_accelerate_config_examples(tmp_path, model_dir, write_jsonl, sft_rows):
    """The example Accelerate configs parse; the CPU one really starts two processes."""
    from accelerate.commands.config.config_args import load_config_from_file

    examples = Path(__file__).parents[1] / "examples" / "accelerate"
    kinds = {
        p.stem: load_config_from_file(str(p)).distributed_type for p in examples.glob("*.yaml")
    }
    assert kinds == {
        "cpu": "MULTI_GPU",
        "multi_gpu": "MULTI_GPU",
        "fsdp": "FSDP",
        "fsdp_cpu": "FSDP",
        "multi_node": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
    }
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(examples / "cpu.yaml"), "-m", "align.cli", "run"]  # no --num-processes: the
    # processes must come from the launcher, not from align starting them itself
    cmd += ["--model", str(model_dir), "--data", str(data), "--max-steps", "2"]
    cmd += ["--output-dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr


def _orpo_rows(count=16):
    """Pairs whose chosen answers differ in length, so the NLL's token counts differ between
    micro-batches and processes while the odds-ratio term counts pairs: two denominators."""
    return [
        {
            "prompt": f"What is {a} + {a % 7}? ",
            "chosen": f"{a} + {a % 7} = {a + a % 7}." + " Sure." * (a % 4),
            "rejected": f"It is {a + a % 7 + 1}.",
        }
        for a in range(count)
    ]


def test_orpo_on_two_processes_equals_one_large_batch(tmp_path, model_dir, write_jsonl):
    """ORPO's two terms (an NLL over chosen tokens, an odds-ratio term over pairs) are each
    normalised over every process: batch 8 on two processes equals batch 16 on one."""
    data = write_jsonl(tmp_path / "d.jsonl", _orpo_rows())
    common = ["run", "--objective", "orpo", "--model", model_dir, "--data", data]
    common += ["--max-steps", "2", "--lr", "1e-2"]
    _torchrun("-m", "align.cli", *common, "--batch-size", "8", "--output-dir", tmp_path / "two")
    result = CliRunner().invoke(
        cli, [*map(str, common), "--batch-size", "16", "--output-dir", str(tmp_path / "one")]
    )
    assert result.exit_code == 0, result.output
    one, two = (
        [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("one", "two")
    )
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {
            "learning_rate",
            "step",
            "epoch",
            "num_tokens",
            "num_tokens_computed",
            "grad_norm",
        }:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert {"loss/nll", "loss/odds_ratio", "nll_loss"} <= one[0].keys()
    _assert_same_final_weights(tmp_path)


def test_an_on_policy_round_on_two_processes_equals_one_process(
    tmp_path, model_dir, write_jsonl, monkeypatch
):
    """Rollouts sampled on each process for its own prompts (a backend whose completions
    depend on the prompt alone): two processes with 2 prompts each train as one process with
    all 4; round metrics (reward_std, completion lengths) are over every process's rollouts."""
    from reinforce_plugin import FixedCompletions, Reinforce

    from align.testing import registered

    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": a + b}
        for a, b in [(1, 2), (10, 20), (3, 4), (7, 30), (12, 1), (5, 5), (40, 2), (8, 9)]
    ]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    common = ["--objective", "reinforce", "--model", model_dir, "--data", data, "--lr", "1e-2"]
    common += ["--reward", "addition", "--reward", "length=0.5", "--generator", "fixed"]
    common += ["--max-completion-length", "8", "--max-steps", "2"]
    worker = Path(__file__).with_name("on_policy_worker.py")
    _torchrun(worker, *common, "--batch-size", "2", "--output-dir", tmp_path / "two")
    with registered(Reinforce(), FixedCompletions(), only=True):
        args = [
            "run",
            *map(str, common),
            "--batch-size",
            "4",
            "--output-dir",
            str(tmp_path / "one"),
        ]
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    def read(name):
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    one, two = read("one"), read("two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"num_tokens", "num_tokens_computed"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), key
    assert one[0]["reward_std"] > 0
    _assert_same_final_weights(tmp_path)


DROP_WRAPPER = """
import gc, sys, types, weakref
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from align.loop.launch import drop_ddp_wrapper

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
inner = torch.nn.Linear(2, 2)
owner = types.SimpleNamespace(model=DistributedDataParallel(inner))
owner.model(torch.ones(1, 2)).sum().backward()
dist.all_gather([torch.zeros(1)], torch.ones(1))  # a finished collective's Python tensors
accelerator = types.SimpleNamespace(_models=[owner.model, "another"])
wrapper = weakref.ref(owner.model)
drop_ddp_wrapper(accelerator, owner)
print(wrapper() is None, owner.model is inner, accelerator._models == ["another"])
dist.destroy_process_group()
"""


def test_the_ddp_wrapper_is_freed_before_the_process_group(tmp_path):
    """DDP's reducer must not be the gloo group's last holder when the group is destroyed:
    freed then, holding the GIL, it can hang the exit (``drop_ddp_wrapper``). The wrapper is
    gone, the model unwrapped, Accelerate's list cleared."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", DROP_WRAPPER, str(tmp_path / "store")]
    done = subprocess.run(cmd, env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True", "True"]
