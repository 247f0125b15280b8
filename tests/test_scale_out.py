"""Scale-out engines run for real on this CPU machine: FSDP2 through ``accelerate launch``
with the shipped CPU config, two nodes through torchrun on the loopback interface, an elastic
restart after a worker is killed, and DeepSpeed ZeRO-2/3 with the shipped configs. Each equals
one process with the doubled batch. Every test checks the engine the run names, so a launch
that silently fell back to plain data parallelism fails.

These tests start several processes each (about 20 s apiece). ``pytest -m "not scale_out"``
skips them locally; CI runs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from align.cli import cli
from align.loop.resume import complete_checkpoints

# Launches with a fixed rendezvous port (accelerate launch, the two nodes) pick it below the
# kernel's ephemeral range, where torchrun --standalone's ports come from (the elastic test
# here, test_distributed.py), so the two kinds never draw the same port.
pytestmark = [pytest.mark.scale_out, pytest.mark.xdist_group("scale_out")]

EXAMPLES = Path(__file__).parents[1] / "examples" / "accelerate"
FSDP_CPU = EXAMPLES / "fsdp_cpu.yaml"
LR = 1e-2


def _free_port() -> int:
    """A free TCP port in 20000–29999 (not one the kernel hands out for port 0), drawn from
    the system's randomness: every run seeds Python's ``random`` with its --seed, so two test
    workers would draw the same port."""
    for _ in range(200):
        port = random.SystemRandom().randrange(20000, 30000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


def _env(tmp_path: Path, name: str) -> dict[str, str]:
    """One thread each; a precomputed-reference cache of this run's own."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_CACHE": str(tmp_path / f"cache-{name}")}


def _fsdp(tmp_path: Path, name: str, args: list, log: Path | None = None):
    """``accelerate launch --config_file examples/accelerate/fsdp_cpu.yaml -m align.cli run``;
    with ``log``, started in the background, its output going to that file."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU)]
    cmd += ["--main_process_port", str(_free_port()), "-m", "align.cli", "run"]
    cmd += [*map(str, args), "--num-processes", "2", "--output-dir", str(tmp_path / name)]
    # torchrun gives workers stopped by a signal 30 s to save, unless told otherwise
    env = {**_env(tmp_path, name), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}
    if log is not None:  # a file, not a pipe nobody reads while the run fills it
        with open(log, "w") as handle:
            return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _one_process(tmp_path: Path, name: str, args: list, monkeypatch) -> None:
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / f"cache-{name}"))
    result = CliRunner().invoke(cli, ["run", *map(str, args), "--output-dir", str(tmp_path / name)])
    assert result.exit_code == 0, result.output


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _run_info(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def _assert_same_metrics(one: list[dict], two: list[dict], exact: bool = False) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        skip = {"step", "epoch", "num_tokens", "num_tokens_computed", "learning_rate"}
        for key in a.keys() - skip:
            if key == "grad_norm" and not exact:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
            else:
                assert a[key] == pytest.approx(b[key], abs=0 if exact else 1e-5), key
        assert (a.get("epoch"), a.get("num_tokens")) == (b.get("epoch"), b.get("num_tokens"))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    adapter = directory / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else directory / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float = LR / 100) -> None:
    """To lr/100: the set-ups sum gradients in another order, and Adam divides each
    coordinate's step by its own scale, which magnifies float-order differences in
    near-zero gradients (see test_distributed.py)."""
    one, two = _weights(a), _weights(b)
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert torch.allclose(value, two[name], atol=atol, rtol=0), name


def _rows(kind: str, count: int = 12) -> list[dict]:
    if kind == "prompt_completion":
        return [
            {"prompt": f"What is {a} + {a % 5}? ", "completion": f"{a + a % 5}." + " ok" * (a % 3)}
            for a in range(count)
        ]
    if kind == "feedback":
        return [
            {
                "prompt": f"What is {a} + 1? ",
                "completion": f"{a + 1}." if a % 2 else "No.",
                "label": a % 2 == 1,
            }
            for a in range(count)
        ]
    return [  # preference; chosen answers of different lengths (ORPO's NLL counts tokens)
        {
            "prompt": f"What is {a} + {a % 7}? ",
            "chosen": f"{a} + {a % 7} = {a + a % 7}." + " Sure." * (a % 4),
            "rejected": f"It is {a + a % 7 + 1}.",
        }
        for a in range(count)
    ]


# objective (or case) → (data format, extra options)
FSDP_CASES = {
    "sft": ("prompt_completion", ["--objective", "sft"]),
    "dpo": ("preference", ["--objective", "dpo"]),  # precomputed reference, packed pairs
    "kto": ("feedback", ["--objective", "kto"]),
    "minorsft": ("prompt_completion", ["--objective", "minorsft"]),
    "ift": ("prompt_completion", ["--objective", "ift"]),
    # the expected embedding reads the first pass's full logits after its forward
    "ift-expected": ("prompt_completion", ["--objective", "ift", "--set", "prediction=expected"]),
    "orpo": ("preference", ["--objective", "orpo"]),
    "lora-dpo": ("preference", ["--objective", "dpo", "--lora", "--reference", "adapter"]),
    "reward-model": ("preference", ["--objective", "reward-model"]),  # a sequence classifier
    "lora-reward-model": ("preference", ["--objective", "reward-model", "--lora"]),
}


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_equals_one_process_with_the_doubled_batch(
    case, tmp_path, model_dir, write_jsonl, monkeypatch
):
    """FSDP2 on two processes (the shipped CPU config, gloo), batch 2 each, for 3 steps and
    an evaluation, equals one process with batch 4: every logged value to 1e-5, the final
    weights (gathered from the shards) to lr/100. The packing probe runs before sharding
    and packs; DPO's precomputed reference is scored before sharding and shared out."""
    fmt, options = FSDP_CASES[case]
    data = write_jsonl(tmp_path / "d.jsonl", _rows(fmt))
    eval_data = write_jsonl(tmp_path / "e.jsonl", _rows(fmt, 5))
    common = [*options, "--model", model_dir, "--data", data, "--eval-data", eval_data]
    common += ["--eval-every", "3", "--max-steps", "3", "--lr", LR]
    result = _fsdp(tmp_path, "two", [*common, "--batch-size", "2"])
    assert "on 2 process(es), FSDP2" in result.stderr
    _one_process(tmp_path, "one", [*common, "--batch-size", "4"], monkeypatch)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 3]
    if case.endswith("reward-model"):
        # Unbounded scores that swing by ~2 a step at this lr (grad norm ~12): the sum order's
        # float differences reach ~1e-5 by step 3. Step 1 is equal to 1e-6; later rows to 1e-4.
        # The evaluation's min/max are those of each micro-batch, and 5 eval records make
        # other micro-batches on 2 processes of 2 than on 1 of 4: left out.
        _assert_same_metrics(one[:1], two[:1])
        for a, b in zip(one[1:], two[1:], strict=True):
            batch_bound = {"eval_min_reward", "eval_max_reward"}
            a, b = ({k: v for k, v in r.items() if k not in batch_bound} for r in (a, b))
            assert a == pytest.approx(b, abs=1e-4, rel=1e-4), a["step"]
    else:
        _assert_same_metrics(one, two)
    info = _run_info(tmp_path / "two")
    assert info["engine"] == "FSDP2" and info["num_processes"] == 2
    # the probe ran (before sharding) and passed; IFT's batches are padded
    assert info["packed_batches"] is (not case.startswith("ift"))
    if case in ("dpo", "lora-dpo"):
        assert info["reference"]["mode"] == ("adapter" if case == "lora-dpo" else "precomputed")
        assert one[-2]["rewards/margins"] != 0  # the policy moved away from the reference
    if case.startswith("lora-"):
        assert (tmp_path / "two" / "final" / "adapter_model.safetensors").exists()
        assert not (tmp_path / "two" / "final" / "model.safetensors").exists()
    if case == "lora-reward-model":
        # LoRA's A matrices get gradients near 0 while B is near 0, which Adam scales up to
        # lr-sized steps whose sign float order decides: compared, the head trained in full.
        one_head, two_head = (
            _weights(tmp_path / name / "final")["base_model.model.score.weight"]
            for name in ("one", "two")
        )
        assert torch.allclose(one_head, two_head, atol=LR / 100, rtol=0)
    else:
        atol = LR / 50 if case == "reward-model" else LR / 100  # its swings: 1 weight in 10⁶
        _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final", atol)


def test_fsdp_run_stopped_by_sigterm_resumes_as_if_uninterrupted(tmp_path, model_dir, write_jsonl):
    """SIGTERM to an FSDP run: both processes stop after one step and save a checkpoint (the
    gathered model, and the sharded model and optimizer for resuming); --resume under FSDP
    then ends where an uninterrupted FSDP run ends, to 1e-6."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows("prompt_completion", 16))
    args = ["--objective", "sft", "--model", model_dir, "--data", data, "--batch-size", "1"]
    args += ["--max-steps", "60", "--lr", LR]
    log = tmp_path / "stopped.log"
    proc = _fsdp(tmp_path, "stopped", args, log=log)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 200
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        assert time.time() < deadline and proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=200)
    stderr = log.read_text()
    # torchrun's agent stops the workers (they save) and raises; accelerate launch exits 1
    assert proc.returncode != 0 and "Resume with the same command and --resume" in stderr
    ((step, checkpoint),) = complete_checkpoints(tmp_path / "stopped")
    assert step < 60
    state = {p.name for p in (checkpoint / "state").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "scheduler.pt"} <= state
    assert any(name.startswith("optimizer") for name in state)
    assert any(name.startswith("pytorch_model_fsdp") for name in state), state  # the shards

    result = _fsdp(tmp_path, "stopped", [*args, "--resume"])
    assert f"Resuming at step {step} of 60" in result.stderr
    _fsdp(tmp_path, "straight", args)
    resumed, straight = _metrics(tmp_path / "stopped"), _metrics(tmp_path / "straight")
    assert [r["step"] for r in resumed] == list(range(1, 61))
    for a, b in zip(resumed, straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    _assert_same_weights(tmp_path / "stopped" / "final", tmp_path / "straight" / "final", 1e-6)


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


def test_two_nodes_equal_one_process_with_the_doubled_batch(
    tmp_path, model_dir, write_jsonl, monkeypatch
):
    """The multi-node path of a cluster, on the loopback interface: `align run` started twice
    by torchrun (--nnodes 2, node ranks 0 and 1, one process each, static rendezvous), both
    writing into one --output-dir. DPO with a precomputed reference (scored on both nodes,
    cached by the first), checkpoints every 2 steps: the same run as one process with the
    doubled batch, one metrics row per step, and checkpoints whose model the first process
    wrote while each process wrote its own RNG state."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows("preference"))
    eval_data = write_jsonl(tmp_path / "e.jsonl", _rows("preference", 5))
    common = ["--objective", "dpo", "--model", model_dir, "--data", data]
    common += ["--eval-data", eval_data, "--eval-every", "2", "--max-steps", "4", "--lr", LR]
    port = _free_port()
    env = _env(tmp_path, "two")  # one cache, on the "shared" file system
    run = [*common, "--batch-size", 2, "--save-every", 2, "--output-dir", tmp_path / "two"]
    nodes, logs = [], [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    for rank, log in enumerate(logs):
        node = ["--nnodes", 2, "--node-rank", rank, "--nproc-per-node", 1]
        node += ["--master-addr", "127.0.0.1", "--master-port", port]
        with open(log, "w") as handle:  # a file, not a pipe nobody reads while the run fills it
            cmd = _torchrun(*node, "-m", "align.cli", "run", *run)
            nodes.append(subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT))
    for node in nodes:
        node.wait(timeout=300)
    errors = [log.read_text() for log in logs]
    for node, stderr in zip(nodes, errors, strict=True):
        assert node.returncode == 0, stderr[-4000:]
    assert "on 2 process(es), data-parallel (DDP) on 2 nodes" in errors[0]
    assert "Training" not in errors[1]  # only the first process prints
    _one_process(tmp_path, "one", [*common, "--batch-size", "4"], monkeypatch)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 2, 3, 4, 4]
    _assert_same_metrics(one, two)
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final")
    info = _run_info(tmp_path / "two")
    assert info["engine"] == "data-parallel (DDP) on 2 nodes" and info["status"] == "completed"
    ((step, checkpoint),) = complete_checkpoints(tmp_path / "two")  # the last step: final/
    state = sorted(p.name for p in (checkpoint / "state").iterdir())
    assert state == [
        "optimizer.bin",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "scheduler.pt",
    ]
    assert step == 2 and (checkpoint / "model.safetensors").exists()
    leftovers = [p.name for p in (tmp_path / "two").rglob(".*")]
    assert leftovers == [".align-lock"]  # no temporary or half-written directory


def test_elastic_restart_resumes_from_the_newest_checkpoint(
    tmp_path, model_dir, write_jsonl, monkeypatch
):
    """torchrun --max-restarts 1, a worker killed (SIGKILL) in the middle of step 3: torchrun
    restarts both workers, which find the run they started and resume from its checkpoint at
    step 2 by themselves. The result equals an uninterrupted run (one process with the
    doubled batch): every step logged once, the same losses and final weights."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows("prompt_completion", 16))
    common = ["--objective", "sft", "--model", model_dir, "--data", data, "--max-steps", "5"]
    common += ["--lr", LR]
    worker = Path(__file__).with_name("elastic_worker.py")
    cmd = _torchrun("--standalone", "--nproc-per-node", 2, "--max-restarts", 1, worker, "run")
    cmd += [*map(str, common), "--batch-size", "2", "--save-every", "2"]
    cmd += ["--output-dir", str(tmp_path / "two")]
    env = {**_env(tmp_path, "two"), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "torchrun restarted the workers (1): Resuming at step 2 of 5" in result.stderr
    info = _run_info(tmp_path / "two")
    assert info["status"] == "completed"
    ((resumed),) = info["resumed"]
    assert resumed["from_step"] == 2 and resumed["elastic_restart"] == 1
    _one_process(tmp_path, "one", [*common, "--batch-size", "4"], monkeypatch)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    _assert_same_metrics(one, two)
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final")


def _deepspeed(tmp_path: Path, stage: int, name: str, args: list):
    """``accelerate launch`` with the shipped ZeRO config, on 2 CPU processes in fp32:
    DeepSpeed's CPU accelerator over gloo (``use_cpu`` stays false, or Accelerate drops
    DeepSpeed). The first launch on a machine compiles DeepSpeed's shared-memory op (about
    2 minutes; cached in ~/.cache/torch_extensions)."""
    if importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("CI"):
            pytest.fail("DeepSpeed is in the test extras: CI must run these tests")
        pytest.skip("DeepSpeed is not installed (pip install deepspeed)")
    config = EXAMPLES / f"deepspeed_zero{stage}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--num_processes", "2", "--mixed_precision", "no"]
    cmd += ["--main_process_port", str(_free_port()), "-m", "align.cli", "run"]
    cmd += [*map(str, args), "--num-processes", "2", "--output-dir", str(tmp_path / name)]
    env = {**_env(tmp_path, name), "DS_ACCELERATOR": "cpu"}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"on 2 process(es), DeepSpeed ZeRO-{stage}" in result.stderr
    return result


@pytest.mark.parametrize(("stage", "objective"), [(2, "dpo"), (3, "sft")])
def test_deepspeed_zero_equals_one_process_with_the_doubled_batch(
    stage, objective, tmp_path, model_dir, write_jsonl, monkeypatch
):
    """DeepSpeed ZeRO-2 (DPO, a precomputed reference) and ZeRO-3 (SFT) on two processes with
    batch 2 each and two micro-batches a step (DeepSpeed's accumulation boundary set by align)
    equal one plain process with batch 4: logged values to 1e-5, final weights to lr/100."""
    fmt = "preference" if objective == "dpo" else "prompt_completion"
    data = write_jsonl(tmp_path / "d.jsonl", _rows(fmt, 16))
    common = ["--objective", objective, "--model", model_dir, "--data", data]
    common += ["--max-steps", "3", "--lr", LR, "--grad-accum", "2"]
    _deepspeed(tmp_path, stage, "two", [*common, "--batch-size", "1"])
    _one_process(tmp_path, "one", [*common, "--batch-size", "2"], monkeypatch)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(two) == 3
    _assert_same_metrics(one, two)
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final")
    assert _run_info(tmp_path / "two")["engine"] == f"DeepSpeed ZeRO-{stage}"


@pytest.fixture(scope="module")
def wide_model_dir(model_dir, tmp_path_factory):
    """The demo model 256 wide: its embedding table (110,080 values) is over ZeRO-3's
    persistence threshold (100,000), so ZeRO-3 partitions it like a real model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("wide-model")
    narrow = AutoModelForCausalLM.from_pretrained(model_dir).config.to_dict()
    config = LlamaConfig(**{**narrow, "hidden_size": 256, "intermediate_size": 256})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return path


def test_ift_under_zero3_mixes_the_partitioned_embeddings(
    tmp_path, wide_model_dir, write_jsonl, monkeypatch
):
    """IFT's expected embedding reads the input table inside the model's forward, before
    ZeRO-3 partitions it again: two processes equal one with the doubled batch. The weights
    agree to 3e-4 (ZeRO-3 takes the log-probs from the full logits, the plain run from the
    hidden states, and Adam magnifies the float-order difference in near-zero gradients)."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows("prompt_completion"))
    common = ["--objective", "ift", "--set", "prediction=expected", "--model", wide_model_dir]
    common += ["--data", data, "--max-steps", "3", "--lr", LR]
    _deepspeed(tmp_path, 3, "two", [*common, "--batch-size", "2"])
    _one_process(tmp_path, "one", [*common, "--batch-size", "4"], monkeypatch)
    _assert_same_metrics(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"))
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final", 3e-4)


def test_deepspeed_zero3_resumes_as_if_uninterrupted(tmp_path, model_dir, write_jsonl):
    """A ZeRO-3 run continued with --resume from its step-2 checkpoint (DeepSpeed's partitioned
    optimizer state under state/) ends where the uninterrupted run ended."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows("prompt_completion", 16))
    args = ["--objective", "sft", "--model", model_dir, "--data", data, "--max-steps", "4"]
    args += ["--lr", LR, "--batch-size", "2", "--save-every", "2"]
    _deepspeed(tmp_path, 3, "straight", args)
    # The run as a crash after step 2 would have left it: the checkpoint, two metrics rows.
    shutil.copytree(tmp_path / "straight", tmp_path / "crashed")
    crashed = tmp_path / "crashed"
    shutil.rmtree(crashed / "final")
    rows = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    info = _run_info(crashed)
    (crashed / "run.json").write_text(json.dumps({**info, "status": "failed"}))
    result = _deepspeed(tmp_path, 3, "crashed", [*args, "--resume"])
    assert "Resuming at step 2 of 4" in result.stderr
    resumed, straight = _metrics(crashed), _metrics(tmp_path / "straight")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    _assert_same_weights(tmp_path / "straight" / "final", crashed / "final", 1e-6)
