"""align against TRL: SFT, DPO and KTO on the same model, data, batch, precision and steps.

    pip install -r benchmarks/requirements.txt       # TRL: the benchmark's, never align's
    python benchmarks/against_trl.py                 # tiny and realistic, table + JSON
    python benchmarks/against_trl.py --workloads tiny --objectives dpo --json out.json
    python benchmarks/against_trl.py --align-only --extra="--precision bf16"   # a lever alone
    python benchmarks/against_trl.py --workloads real --models qwen2.5-0.5b --precisions bf16

Workloads:

- ``tiny``: the demo model (a 4-layer Llama, 128 wide, vocabulary 430) on the whole demo train
  split (2000 records), one epoch, batch 8. What a user waits for: the whole process, from
  launch to exit (imports, tokenising, the reference, every step, the final save).
- ``realistic``: a 4-layer Llama, 256 wide, with a 32,000-token vocabulary and sequences up to
  512 tokens (prompts of 100-300 tokens, completions of 50-200), batch 4, a few steps: steady
  state, as examples (pairs) per second over the steps after the warm-up.
- ``real`` (not in the default run: hours on 2 CPU cores, see below): models of the published
  shapes of Qwen2.5-0.5B (494M parameters, vocabulary 151,936) and Llama-3.2-1B (1.24B,
  vocabulary 128,256), random weights saved with ``save_pretrained`` (safetensors), with a
  byte-level BPE of exactly that vocabulary, built offline (one token per word, the words drawn
  uniformly from all of it, so the whole head is exercised); sequences of 1,040-1,230 tokens
  (prompts of 768-896 words, answers of 256-320: prompts longer than answers, as is typical),
  ``max_length`` 2048; fp32 and bf16 (align ``--precision bf16``, TRL ``bf16=True``: autocast
  over float32 weights on both sides); micro-batch 1 (KTO: 2, since TRL's KTO needs two
  examples for its KL term), 3 steps of which the first is the warm-up, 2 repeats. Per row
  also: the peak RSS above baseline at the next micro-batch (a run of 2 steps, stopped as soon
  as it passes 20 GiB, ``--memory-cap-gib``) and from the two, the largest micro-batch that
  fits in 20 GiB (``peak(b) = a + b * slope``, extrapolated; measured when the larger run did
  not fit). TRL's ``use_liger_kernel`` row runs only where liger-kernel, triton and CUDA are
  there; elsewhere it is reported as not run. ``--models`` runs the rows of one model,
  ``--precisions`` of one precision; ``--smoke`` runs the whole workload on 1-layer, 64-wide
  models of the same vocabularies with short sequences (about 10 minutes), to check the script.
  On 2 cores a 0.5B row (align and TRL, 2 repeats and the next micro-batch) takes several
  minutes in bf16 and more in fp32, DPO and KTO several times SFT; the 1B model's rows take
  2.5 times as long, and its fp32 rows need about 19 GiB of weights, gradients and AdamW state
  before any activation: on a 24 GiB machine they stop (every child stops itself, reporting
  it, when the machine has less than 1 GiB available) rather than finish.

Every run is a fresh process with its own empty reference cache; the rows of one objective and
workload run interleaved (align, TRL, align, TRL, ...) ``--repeat`` times and report medians, so
a slow spell of the machine hits both. Both frameworks run with their defaults (align: the
precomputed reference; TRL: a reference model copy run every step and, since TRL 1.x,
``gradient_checkpointing=True``) at the same precision, learning rate and ``max_length``. The
precision is explicit on both sides: TRL 1.16 turns ``bf16`` on by default (on the CPU too), so
fp32 rows pass ``bf16=False``. TRL saves its final model as a user would
(``trainer.save_model``), logs every 10 steps, no checkpoints, no evaluation. Figures per run:
``wall s`` (launch to exit), ``first step s`` (launch to the end of the first step), ``s/step``
(median of the steps after the warm-up), ``ex/s`` (examples, or pairs, per second over those
steps), ``tok/s`` (non-padding tokens per second, from the tokens of the examples each step
trained on), ``peak MiB`` (peak RSS) and ``+MiB`` (peak RSS above the RSS after importing torch
and transformers, before the framework is imported). At the end the rows are printed again as
Markdown tables for the README.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WORKLOADS: dict[str, dict[str, Any]] = {
    # warmup: the first steps, left out of s/step; repeat: runs per row unless --repeat
    "tiny": {"batch": 8, "max_length": 64, "steps": None, "warmup": 6, "repeat": 3},
    "realistic": {"batch": 4, "max_length": 512, "steps": 8, "warmup": 3, "repeat": 3},
    "real": {"batch": 1, "max_length": 2048, "steps": 3, "warmup": 1, "repeat": 2},
}
DATA_FORMATS = {"sft": "prompt_completion", "dpo": "preference", "kto": "feedback"}
LEARNING_RATE = "1e-5"

# -- the real workload: published shapes, random weights ----------------------------------------
REAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-0.5b": (
        "Qwen2",
        {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
        },
    ),
    "llama-3.2-1b": (
        "Llama",
        {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "vocab_size": 128256,
            "tie_word_embeddings": True,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
        },
    ),
}
REAL_BATCHES = {"sft": 1, "dpo": 1, "kto": 2}  # timed micro-batch; TRL's KTO refuses 1
REAL_PROMPT = (768, 896)  # tokens (words) of a prompt
REAL_ANSWER = (256, 320)  # tokens of an answer (chosen, rejected, completion)
REAL_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
SMOKE_SHAPE = {  # --smoke: the published vocabularies, everything else tiny
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
MEMORY_CAP_GIB = 20.0  # "fits": peak RSS above baseline at most this (--memory-cap-gib)
MEMORY_STEPS = 2  # the next micro-batch's run: its second step holds AdamW's state too
MACHINE_RESERVE_MIB = 1024  # a child stops itself below this much available memory
EXIT_OVER_CAP, EXIT_NO_MEMORY = 75, 76


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_mib() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


# -- the workloads' files ----------------------------------------------------------------------
def build_realistic_model(path: Path) -> Path:
    """The demo tokenizer and a Llama of realistic shape: vocabulary 32,000, 512 positions."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from align import demo

    tokenizer = demo.build_tokenizer()
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def real_words(vocab_size: int) -> list[str]:
    """The words of the real tokenizer, one token each (`` w`` is the token ``Ġw``), in the
    order of their ids: every string of 1-3 letters, then strings of 4 letters up to
    ``vocab_size`` tokens in all. The set holds every prefix of each of its words, which is what
    lets a byte-level BPE build each word with one merge per letter."""
    import itertools
    import string

    words: list[str] = []
    wanted = vocab_size - len(REAL_SPECIALS) - 256  # less the specials and the byte alphabet
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            if len(words) == wanted:
                return words
            words.append("".join(letters))
    raise AssertionError("unreachable")


def build_real_tokenizer(vocab_size: int):
    """A byte-level BPE of exactly ``vocab_size`` ids, built rather than trained: the specials,
    the 256 byte symbols, then `` w`` for every word of :func:`real_words`, each made by merging
    its prefix with its last letter. So a text of n words (after the first, which has no space
    before it and costs up to 4 tokens) is n tokens, spread over the whole vocabulary. It is
    what transformers' Qwen2Tokenizer rebuilds from ``vocab`` and ``merges`` (AutoTokenizer
    uses that class for a ``qwen2`` model whatever the saved class), so Qwen and Llama
    directories tokenise alike. The chat template's role markers are special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from align.demo import CHAT_TEMPLATE

    vocab = {token: i for i, token in enumerate(REAL_SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    space = "\u0120"  # the byte-level symbol of " "
    merges = []
    for word in real_words(vocab_size):
        merges.append((space + word[:-1] if len(word) > 1 else space, word[-1]))
        vocab[space + word] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in REAL_SPECIALS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def use_smoke_shapes() -> None:
    """--smoke: 1-layer, 64-wide models of the published vocabularies, prompts of 48-64 tokens
    and answers of 16-24, so the whole real workload runs in minutes."""
    global REAL_PROMPT, REAL_ANSWER
    for _, shape in REAL_MODELS.values():
        shape.update(SMOKE_SHAPE)
        if "head_dim" in shape:
            shape["head_dim"] = SMOKE_SHAPE["hidden_size"] // SMOKE_SHAPE["num_attention_heads"]
    REAL_PROMPT, REAL_ANSWER = (48, 64), (16, 24)


def build_real_model(name: str, path: Path) -> None:
    """The model of a published config with random weights, and its tokenizer (in a child
    process: the parent stays small while the runs go on)."""
    import torch
    import transformers

    family, shape = REAL_MODELS[name]
    tokenizer = build_real_tokenizer(shape["vocab_size"])
    config = getattr(transformers, f"{family}Config")(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def real_model(name: str, work: Path, smoke: bool = False) -> str:
    path = work / f"model-{name}{'-smoke' * smoke}"
    if not (path / "config.json").exists():
        started = time.time()
        command = [sys.executable, __file__, "--build-model", name, str(path)]
        command += ["--smoke"] if smoke else []
        subprocess.run(command, check=True, capture_output=True, text=True)
        print(f"built {name} (random weights) in {time.time() - started:.0f}s: {path}")
    return str(path)


def _text(rng: random.Random, tokens: int) -> str:
    # The demo tokenizer spends about one token per 2.5 characters of these words.
    words = ["What", "is", "the", "sum", "of", "and", "then", "add", "it", "to", "equals"]
    words += [str(n) for n in range(50)]
    out: list[str] = []
    while len(" ".join(out)) < tokens * 2.5:
        out.append(rng.choice(words))
    return " ".join(out)


def _words(rng: random.Random, words: list[str], span: tuple[int, int]) -> str:
    """A text of the real tokenizer's words: one token each, drawn uniformly from them all."""
    return " ".join(rng.choice(words) for _ in range(rng.randint(*span)))


def write_realistic_data(
    path: Path, data_format: str, records: int, vocab_size: int | None = None
) -> Path:
    """``records`` records of the data format; with ``vocab_size``, the real workload's (words
    of the real tokenizer, REAL_PROMPT and REAL_ANSWER long), else the realistic one's."""
    rng = random.Random(0)
    words = real_words(vocab_size) if vocab_size else []
    rows = []
    for i in range(records):

        def text(kind: str) -> str:
            if vocab_size is None:
                span = (100, 300) if kind == "prompt" else (50, 200)
                return _text(rng, rng.randint(*span))
            return _words(rng, words, REAL_PROMPT if kind == "prompt" else REAL_ANSWER)

        prompt = [{"role": "user", "content": text("prompt")}]

        def answer() -> list[dict[str, str]]:
            return [{"role": "assistant", "content": text("answer")}]

        if data_format == "preference":
            rows.append({"prompt": prompt, "chosen": answer(), "rejected": answer()})
        elif data_format == "feedback":
            rows.append({"prompt": prompt, "completion": answer(), "label": i % 2 == 0})
        else:
            rows.append({"messages": prompt + answer()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tokens_per_example(model: str, data: str, objective: str, max_length: int) -> float:
    """Mean non-padding tokens an example (a pair: both sequences) feeds the policy, as align
    tokenises it."""
    from transformers import AutoTokenizer

    from align.data.examples import tokenize_records
    from align.data.records import read_records
    from align.data.store import example_length

    tokenizer = AutoTokenizer.from_pretrained(model)
    examples, _ = tokenize_records(
        read_records(data), DATA_FORMATS[objective], tokenizer, max_length, "keep_start", "train"
    )
    return statistics.fmean(example_length(e) for e in examples)


def liger_unavailable() -> str | None:
    """Why TRL's ``use_liger_kernel`` row cannot run here, or None when it can."""
    missing = [m for m in ("liger_kernel", "triton") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not run: needs CUDA/triton ({', '.join(missing)} not installed)"
    import torch

    if not torch.cuda.is_available():
        return "not run: needs CUDA/triton (no CUDA device)"
    return None


# -- one run, in a child process ---------------------------------------------------------------
def run_align(args: argparse.Namespace, step_times: list[float]) -> None:
    import align
    from align import plugins
    from align.cli import cli

    class Clock:
        __name__ = "benchmark-clock"

        @align.hookimpl
        def align_metrics(self):
            step_times.append(time.time())
            return {}

    plugins.reset_registry(plugins.load_plugins(extra=[Clock()]))
    argv = ["run", "--objective", args.objective, "--model", args.model, "--data", args.data]
    argv += ["--batch-size", str(args.batch), "--max-length", str(args.max_length)]
    argv += ["--lr", LEARNING_RATE, "--output-dir", args.out, "--overwrite"]
    argv += ["--max-steps", str(args.steps)] if args.steps else []
    argv += ["--precision", "bf16"] if args.precision == "bf16" else []
    argv += shlex.split(args.extra)
    cli.main(argv, standalone_mode=False)


def run_trl(args: argparse.Namespace, step_times: list[float]) -> None:
    import datasets
    import trl
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_times.append(time.time())

    datasets.disable_progress_bars()
    data = datasets.load_dataset("json", data_files=args.data, split="train")
    common = {
        "output_dir": args.out,
        "per_device_train_batch_size": args.batch,
        "learning_rate": float(LEARNING_RATE),
        "max_length": args.max_length,
        "num_train_epochs": 1,
        "max_steps": args.steps or -1,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": args.precision == "bf16",  # TRL 1.x defaults to True, on the CPU too
        "disable_tqdm": True,
        "seed": 42,
    }
    common.update(json.loads(args.trl_options or "{}"))
    config_class, trainer_class = {
        "sft": (trl.SFTConfig, trl.SFTTrainer),
        "dpo": (trl.DPOConfig, trl.DPOTrainer),
        "kto": (trl.KTOConfig, trl.KTOTrainer),
    }[args.objective]
    trainer = trainer_class(
        model=args.model,
        args=config_class(**common),
        train_dataset=data,
        callbacks=[Clock()],
    )
    trainer.train()
    trainer.save_model(str(Path(args.out) / "final"))


def memory_guard(baseline: float, cap_mib: float) -> None:
    """Stop this process (reporting how far it got) once its RSS passes ``baseline + cap_mib``
    (when ``cap_mib``), or when the machine has less than MACHINE_RESERVE_MIB available: a run
    that cannot fit ends cleanly instead of pushing the machine into the OOM killer."""

    def watch() -> None:
        highest = 0.0
        while True:
            above = rss_mib() - baseline
            highest = max(highest, above)
            over_cap = bool(cap_mib) and above > cap_mib
            if over_cap or available_mib() < MACHINE_RESERVE_MIB:
                status = "over_cap" if over_cap else "out_of_memory"
                stopped = {"status": status, "above_baseline_mib": highest}
                print("BENCH-STOPPED " + json.dumps(stopped), flush=True)
                os._exit(EXIT_OVER_CAP if over_cap else EXIT_NO_MEMORY)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401  (the baseline: what any trainer imports first)
    import transformers  # noqa: F401

    baseline = rss_mib()
    memory_guard(baseline, args.memory_cap_mib or 0)
    step_times: list[float] = []
    (run_align if args.framework == "align" else run_trl)(args, step_times)
    figures = {"step_times": step_times, "baseline_rss_mib": baseline, "peak": peak_rss_mib()}
    print("BENCH " + json.dumps(figures), flush=True)


# -- the log-prob computation alone ------------------------------------------------------------
LOGPROB_SHAPE = (8, 512, 32000)  # a realistic DPO micro-batch: 4 pairs, 512 tokens, 32k vocab


def logprob_child(method: str, dtype: str) -> None:
    """Forward and backward of the completion log-probs from given logits; peak RSS above the
    RSS with the logits (and their random targets and mask) allocated."""
    import torch

    from align.model.logprobs import token_logps

    torch.manual_seed(0)
    rows, length, vocab = LOGPROB_SHAPE
    logits = torch.randn(rows, length, vocab, dtype=getattr(torch, dtype)).requires_grad_()
    ids = torch.randint(0, vocab, (rows, length))
    mask = torch.zeros(rows, length, dtype=torch.long)
    mask[:, length // 2 :] = 1  # the second half of each sequence is its completion
    baseline = rss_mib()
    started = time.perf_counter()
    if method == "naive":
        logps = torch.log_softmax(logits.float()[:, :-1], -1)
        logps = logps.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    else:
        logps, _ = token_logps(logits, ids, mask)
    logps.sum().backward()
    seconds = time.perf_counter() - started
    print("BENCH " + json.dumps({"peak": peak_rss_mib() - baseline, "seconds": seconds}))


def measure_logprobs(dtype: str) -> dict:
    figures = {}
    for method in ("naive", "align"):
        command = [sys.executable, __file__, "--logprob-child", method, dtype]
        result = subprocess.run(command, capture_output=True, text=True)
        line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH ")), None)
        if result.returncode or line is None:
            raise RuntimeError(f"log-prob benchmark failed:\n{result.stderr[-3000:]}")
        figures[method] = json.loads(line[len("BENCH ") :])
    mib = LOGPROB_SHAPE[0] * LOGPROB_SHAPE[1] * LOGPROB_SHAPE[2] * 4 / 2**20
    print(
        f"log-probs of {'x'.join(map(str, LOGPROB_SHAPE))} {dtype} logits ({mib:.0f} MiB as "
        f"float32), forward + backward: peak above the logits {figures['naive']['peak']:.0f} "
        f"MiB naive (log_softmax, gather), {figures['align']['peak']:.0f} MiB align "
        f"({figures['align']['peak'] / figures['naive']['peak']:.2f}x); "
        f"{figures['naive']['seconds']:.2f}s vs {figures['align']['seconds']:.2f}s",
        flush=True,
    )
    return {"dtype": dtype, "shape": LOGPROB_SHAPE, **figures}


# -- the parent --------------------------------------------------------------------------------
def measure(
    framework: str,
    objective: str,
    workload: str,
    model: str,
    data: str,
    work: Path,
    tokens: float,
    extra: str = "",
    trl_options: str = "",
    *,
    batch: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    precision: str = "fp32",
    cap_mib: float = 0,
    label: dict[str, Any] | None = None,
) -> dict:
    """One run in a fresh process; its figures, or ``status`` saying why there are none."""
    settings = WORKLOADS[workload]
    batch = batch or settings["batch"]
    steps = settings["steps"] if steps is None else steps
    warmup = settings["warmup"] if warmup is None else warmup
    out = work / f"run-{framework}-{objective}"
    command = [sys.executable, __file__, "--child", framework, "--objective", objective]
    command += ["--model", model, "--data", data, "--out", str(out)]
    command += ["--batch", str(batch), "--max-length", str(settings["max_length"])]
    command += ["--steps", str(steps or 0), f"--extra={extra}", f"--precision={precision}"]
    command += [f"--trl-options={trl_options}", f"--memory-cap-mib={cap_mib}"]
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    env = {**os.environ, "ALIGN_CACHE": str(cache), "TQDM_DISABLE": "1"}
    env["HF_DATASETS_CACHE"] = str(cache / "datasets")
    launched = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - launched
    shutil.rmtree(out, ignore_errors=True)  # the real workload's saves are GiBs each
    shutil.rmtree(cache, ignore_errors=True)
    row: dict[str, Any] = {
        **(label or {}),
        "framework": framework,
        "objective": objective,
        "workload": workload,
        "precision": precision,
        "batch": batch,
        "options": extra or trl_options or "defaults",
        "status": "ok",
        "wall_s": round(wall, 2),
    }
    lines = result.stdout.splitlines()
    line = next((x for x in lines if x.startswith("BENCH ")), None)
    stopped = next((x for x in lines if x.startswith("BENCH-STOPPED ")), None)
    if stopped is not None:
        row.update(json.loads(stopped[len("BENCH-STOPPED ") :]))
        return row
    if result.returncode == -9:  # the kernel's OOM killer, before the guard saw it coming
        row["status"] = "out_of_memory"
        return row
    if result.returncode or line is None:
        message = (result.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{framework} {objective} {workload} failed:\n{result.stderr[-3000:]}", flush=True)
        row.update(status="failed", error=message[:300])
        return row
    f = json.loads(line[len("BENCH ") :])
    times = f["step_times"]
    durations = [b - a for a, b in zip(times, times[1:], strict=False)][max(warmup, 1) - 1 :]
    if not durations:
        row.update(status="failed", error=f"{len(times)} steps: none timed after the warm-up")
        return row
    step_s = statistics.median(durations)
    examples_per_s = batch / step_s
    row.update(
        {
            "steps": len(times),
            "first_step_s": round(times[0] - launched, 2),
            "s_per_step": round(step_s, 4),
            "examples_per_s": round(examples_per_s, 3),
            "tokens_per_s": round(examples_per_s * tokens, 1),
            "peak_rss_mib": round(f["peak"], 1),
            "peak_above_baseline_mib": round(f["peak"] - f["baseline_rss_mib"], 1),
        }
    )
    return row


def medians(runs: list[dict]) -> dict:
    """One row from repeated runs of a configuration: the median of each figure."""
    row = dict(runs[0])
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = round(statistics.median(r[key] for r in runs), 4)
    row["repeats"] = len(runs)
    return row


def summarise(runs: list[dict]) -> dict:
    """Medians of the runs that finished; the first stop or failure when none did."""
    done = [r for r in runs if r.get("status", "ok") == "ok"]
    if not done:
        return {**runs[0], "repeats": 0}
    return {**medians(done), "repeats": len(done)}


STATUS_TEXT = {
    "over_cap": "over the memory cap",
    "out_of_memory": "out of machine memory",
    "failed": "failed",
}


def largest_micro_batch(row: dict, cap_mib: float) -> tuple[int | None, str]:
    """The largest micro-batch whose peak RSS above baseline fits in ``cap_mib``, from the
    timed micro-batch's peak and the next one's: measured where one of them does not fit,
    else ``peak(b) = a + b * slope`` extrapolated."""
    batch, peak = row["batch"], row.get("peak_above_baseline_mib")
    if row["status"] in ("over_cap", "out_of_memory") or (peak is not None and peak > cap_mib):
        # not even the timed micro-batch fits (KTO's is 2: 1 was not measured)
        return (0, "measured") if batch == 1 else (None, f"< {batch}, measured")
    if peak is None:
        return None, "no figure"
    if row.get("next_status") == "over_cap":
        return batch, "measured"
    after = row.get("next_peak_above_baseline_mib")
    if after is None:
        return None, "not measured"
    slope = after - peak
    if slope <= 0:
        return None, "no growth with the micro-batch"
    return math.floor((cap_mib - (peak - batch * slope)) / slope), "extrapolated"


def fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_row(r: dict) -> None:
    first = f"{r.get('model', r['workload']):12} {r['precision']:4} {r['objective']:4} "
    first += f"{r['framework']:6} {r['options'][:28]:28}"
    if r.get("status", "ok") != "ok":
        print(f"{first} {status_text(r)} {r.get('error', '')}", flush=True)
        return
    print(
        f"{first} {r['wall_s']:8.1f} {r['first_step_s']:10.1f} {r['s_per_step']:8.3f} "
        f"{r['examples_per_s']:8.2f} {r['tokens_per_s']:9.0f} {r['peak_rss_mib']:9.0f} "
        f"{r['peak_above_baseline_mib']:7.0f}",
        flush=True,
    )


def trainer_name(r: dict) -> str:
    if r["framework"] == "align":
        return "align" + (f" `{r['options']}`" if r["options"] != "defaults" else "")
    options = json.loads(r["options"]) if r["options"] != "defaults" else {}
    if options.get("precompute_ref_log_probs"):
        return "TRL, precomputed reference"
    if options.get("use_liger_kernel"):
        return "TRL, use_liger_kernel"
    return "TRL" + (f" `{r['options']}`" if options else "")


def advantage(row: dict, align_row: dict | None) -> str:
    """align's figures over a TRL row's (on the TRL row, as in the README)."""
    if row["framework"] == "align" or align_row is None:
        return ""
    if row.get("status", "ok") != "ok" or align_row.get("status", "ok") != "ok":
        return ""
    if row["workload"] == "tiny":
        return f"{row['wall_s'] / align_row['wall_s']:.2f}x faster epoch"
    parts = [
        f"{align_row['examples_per_s'] / row['examples_per_s']:.2f}x examples/s",
        f"{align_row['peak_above_baseline_mib'] / row['peak_above_baseline_mib']:.2f}x +MiB",
    ]
    mine, theirs = align_row.get("largest_micro_batch"), row.get("largest_micro_batch")
    if mine is not None and theirs:
        parts.append(f"{mine / theirs:.1f}x micro-batch")
    return ", ".join(parts)


def status_text(r: dict) -> str:
    text = STATUS_TEXT.get(r["status"], r["status"])
    if r.get("above_baseline_mib"):
        text += f" (stopped at +{r['above_baseline_mib']:.0f} MiB)"
    return text


def markdown(rows: list[dict], cap_gib: float = MEMORY_CAP_GIB) -> str:
    """The rows as the README's tables: one for tiny and realistic, one for real."""

    def align_of(r: dict) -> dict | None:
        key = ("model", "precision", "objective", "workload")
        same = (a for a in rows if a["framework"] == "align")
        return next((a for a in same if all(a.get(k) == r.get(k) for k in key)), None)

    def table(columns: list[str], right: int, cells: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(columns) + " |"]
        rule = ["---"] * right + ["---:"] * (len(columns) - right - 1) + ["---"]
        lines.append("| " + " | ".join(rule) + " |")
        for row in cells:
            row = row + [""] * (len(columns) - len(row))
            lines.append("| " + " | ".join(row) + " |")
        return lines

    out: list[str] = []
    small = [r for r in rows if r["workload"] != "real"]
    if small:
        cells = []
        for r in small:
            name = trainer_name(r) + ("" if r["precision"] == "fp32" else f", {r['precision']}")
            first = [r["workload"], r["objective"], name]
            if r.get("status", "ok") != "ok":
                cells.append(first + [status_text(r)])
                continue
            cells.append(
                first
                + [f"{r['wall_s']:.1f}", f"{r['first_step_s']:.1f}", f"{r['s_per_step']:.3f}"]
                + [f"{r['examples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}"]
                + [f"{r['peak_rss_mib']:.0f}", f"{r['peak_above_baseline_mib']:.0f}"]
                + [advantage(r, align_of(r))]
            )
        columns = ["workload", "objective", "trainer", "wall s", "first step s", "s/step"]
        columns += ["examples/s", "tokens/s", "peak MiB", "+MiB", "align's advantage"]
        out += table(columns, 3, cells)
    real = [r for r in rows if r["workload"] == "real"]
    if real:
        cells = []
        for r in real:
            first = [r["model"], r["precision"], r["objective"], trainer_name(r), str(r["batch"])]
            largest = r.get("largest_micro_batch")
            largest = f"{largest} ({r['largest_method']})" if largest is not None else "—"
            if r.get("largest_micro_batch") is None and r.get("largest_method", "").startswith("<"):
                largest = r["largest_method"]
            if r.get("peak_above_baseline_mib") is None:
                cells.append(first + [status_text(r)] + [""] * 5 + [largest])
                continue
            if r.get("next_status") == "over_cap":
                after = f"> {cap_gib * 1024:.0f}"
            elif r.get("next_status") not in (None, "ok"):
                after = STATUS_TEXT.get(r["next_status"], r["next_status"])
            else:
                after = fmt(r.get("next_peak_above_baseline_mib"), ".0f")
            cells.append(
                first
                + [f"{r['wall_s']:.1f}", f"{r['s_per_step']:.2f}", f"{r['examples_per_s']:.3f}"]
                + [f"{r['tokens_per_s']:.0f}", f"{r['peak_above_baseline_mib']:.0f}", after]
                + [largest, advantage(r, align_of(r))]
            )
        columns = ["model", "precision", "objective", "trainer", "micro-batch", "wall s"]
        columns += ["s/step", "examples/s", "tokens/s", "+MiB", "+MiB at micro-batch + 1"]
        columns += [f"largest micro-batch in {cap_gib:g} GiB", "align's advantage"]
        out += [""] * bool(out) + table(columns, 4, cells)
    return "\n".join(out)


def measure_objective(
    args: argparse.Namespace,
    workload: str,
    model_name: str,
    model: str,
    precision: str,
    objective: str,
    work: Path,
) -> list[dict]:
    """The rows of one objective: align's and TRL's runs interleaved, their medians; for the
    real workload also the next micro-batch's peak and the largest micro-batch in 20 GiB."""
    from align import demo

    settings = WORKLOADS[workload]
    real = workload == "real"
    fmt_name = DATA_FORMATS[objective]
    vocab = REAL_MODELS[model_name][1]["vocab_size"] if real else None
    batch = REAL_BATCHES[objective] if real else settings["batch"]

    def data_file(batch: int, steps: int) -> str:
        path = work / f"{workload}-{model_name}-{fmt_name}-{batch * steps}.jsonl"
        return str(write_realistic_data(path, fmt_name, batch * steps, vocab))

    if workload == "tiny":
        data = str(demo.demo_data(fmt_name, "train"))
    else:
        data = data_file(batch, settings["steps"])
    tokens = tokens_per_example(model, data, objective, settings["max_length"])
    label = {"model": model_name} if real else {}
    liger = liger_unavailable() if real and not args.align_only else None
    runs = [("align", args.extra, "")]
    if not args.align_only:
        runs.append(("trl", "", ""))
        if objective == "dpo" and not real:
            runs.append(("trl", "", json.dumps({"precompute_ref_log_probs": True})))
        if real and liger is None:
            runs.append(("trl", "", json.dumps({"use_liger_kernel": True, "use_cpu": False})))

    def run(framework: str, extra: str, trl_options: str, note: str, **kwargs: Any) -> dict:
        if real:
            what = f"{model_name} {precision} {objective} {framework} {trl_options or extra}"
            print(f"  {what} {note}...", flush=True)
        return measure(
            framework,
            objective,
            workload,
            model,
            kwargs.pop("data", data),
            work,
            tokens,
            extra,
            trl_options,
            precision=precision,
            label=label,
            **kwargs,
        )

    repeat = args.repeat or settings["repeat"]
    cap_mib = args.memory_cap_gib * 1024
    repeats: list[list[dict]] = [[] for _ in runs]
    for i in range(repeat):  # interleaved, so a slow spell of the machine hits all
        for done, (framework, extra, trl_options) in zip(repeats, runs, strict=True):
            if done and done[-1]["status"] != "ok":
                continue  # it stopped or failed: it would again
            note = f"micro-batch {batch}, repeat {i + 1}/{repeat}"
            done.append(run(framework, extra, trl_options, note, batch=batch))
    rows = [summarise(done) for done in repeats]
    if not real:
        return rows
    for row, (framework, extra, trl_options) in zip(rows, runs, strict=True):
        peak = row.get("peak_above_baseline_mib")
        if not args.no_largest and peak is not None and peak <= cap_mib:
            after = run(
                framework,
                extra,
                trl_options,
                f"micro-batch {batch + 1}, peak memory",
                data=data_file(batch + 1, MEMORY_STEPS),
                batch=batch + 1,
                steps=MEMORY_STEPS,
                cap_mib=cap_mib,
            )
            row["next_status"] = after["status"]
            row["next_peak_above_baseline_mib"] = after.get("peak_above_baseline_mib")
            row["next_s_per_step"] = after.get("s_per_step")
        if row["status"] in ("ok", "over_cap", "out_of_memory"):
            row["largest_micro_batch"], row["largest_method"] = largest_micro_batch(row, cap_mib)
    if liger is not None:
        options = json.dumps({"use_liger_kernel": True})
        rows.append(
            {**label, "framework": "trl", "objective": objective, "workload": workload}
            | {"precision": precision, "batch": batch, "options": options, "status": liger}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="tiny,realistic", help="tiny, realistic, real")
    parser.add_argument("--objectives", default="sft,dpo,kto")
    parser.add_argument("--models", default=",".join(REAL_MODELS), help="real: which shapes")
    parser.add_argument("--precisions", help="fp32,bf16 (default: real both, the others fp32)")
    parser.add_argument("--align-only", action="store_true", help="skip the TRL runs")
    parser.add_argument("--extra", default="", help="extra `align run` options for align's runs")
    parser.add_argument("--json", default="benchmark-against-trl.json", help="where to write")
    parser.add_argument("--repeat", type=int, help="runs per row, medians (default 3; real 2)")
    parser.add_argument("--no-largest", action="store_true", help="real: no next micro-batch")
    parser.add_argument(
        "--memory-cap-gib", type=float, default=MEMORY_CAP_GIB, help="real: what fits (20)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="real: 1-layer, 64-wide models, short sequences"
    )
    parser.add_argument("--logprobs-only", action="store_true", help="only the log-prob figures")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--logprob-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--build-model", nargs=2, help=argparse.SUPPRESS)
    for hidden in ("--objective", "--model", "--data", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--memory-cap-mib", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--trl-options", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.logprob_child:
        logprob_child(*args.logprob_child)
        return
    if args.smoke:
        use_smoke_shapes()
    if args.build_model:
        build_real_model(args.build_model[0], Path(args.build_model[1]))
        return
    if args.child:
        args.framework = args.child
        child(args)
        return

    from align import demo

    workloads = args.workloads.split(",")
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}: {', '.join(WORKLOADS)}")
    for name in args.models.split(","):
        if name not in REAL_MODELS:
            parser.error(f"unknown model {name!r}: {', '.join(REAL_MODELS)}")
    work = Path(tempfile.mkdtemp(prefix="align-vs-trl-"))
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}; work directory {work}\n")
    results: dict[str, Any] = {}
    if args.logprobs_only or {"tiny", "realistic"} & set(workloads):
        results["logprobs"] = [measure_logprobs(d) for d in ("float32", "bfloat16")]
    if args.logprobs_only:
        return
    header = f"{'workload':12} {'prec':4} {'obj':4} {'frame':6} {'options':28} {'wall s':>8} "
    header += f"{'1st step s':>10} {'s/step':>8} {'ex/s':>8} {'tok/s':>9} {'peak MiB':>9} "
    header += f"{'+MiB':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    results["runs"] = []
    started = time.time()
    for workload in workloads:
        precisions = args.precisions or ("fp32,bf16" if workload == "real" else "fp32")
        for model_name in args.models.split(",") if workload == "real" else [workload]:
            if workload == "tiny":
                model = str(demo.demo_model_path())
            elif workload == "realistic":
                model = str(build_realistic_model(work / "realistic-model"))
            else:
                model = real_model(model_name, work, args.smoke)
            for precision in precisions.split(","):
                for objective in args.objectives.split(","):
                    rows = measure_objective(
                        args, workload, model_name, model, precision, objective, work
                    )
                    for row in rows:
                        results["runs"].append(row)
                        print_row(row)
                    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            if workload == "real":
                shutil.rmtree(model, ignore_errors=True)
    print(
        f"\nall runs: {time.time() - started:.0f}s\n\n"
        + markdown(results["runs"], args.memory_cap_gib)
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
