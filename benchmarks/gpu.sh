#!/usr/bin/env bash
# The CUDA figures of align's packed batches, on one GPU, in under 8 minutes; a Markdown table.
#
# What it measures (all at the published Qwen2.5-0.5B shape, random weights, bf16 autocast over
# float32 weights, as `align run --precision bf16` trains):
#
#  1. Attention kernels on packed batches (align.model.attention), the model's decoder alone
#     (no vocabulary head, whose cost per token is the same in every layout): milliseconds per
#     forward + backward, real tokens per second and peak CUDA memory, for
#       - DPO pairs (prompts of 768-896 tokens shared by two answers of 256-320) and
#       - SFT sequences (a prompt and one answer each: plain packing),
#     under: padded rows (sdpa); packed rows capped at the widest group with the dense boolean
#     T x T mask (sdpa: today's path, the CPU path); the same rows filled to a token budget
#     (sdpa: what filling costs a dense mask); FlexAttention's block mask, rows capped and
#     filled (no dense mask is built); flash attention's variable lengths, rows filled (SFT
#     only: a shared prompt has no flash form; needs flash-attn installed).
#  2. The real workload end to end (benchmarks/against_trl.py --workloads real, Qwen2.5-0.5B
#     shape, bf16, DPO and SFT, align alone): seconds a step with $ALIGN_PACKED_ATTENTION=sdpa
#     (the dense-mask path) against the CUDA packed path (auto: flex_attention, or flash
#     attention for plain packing; the run logs "packed attention: ...").
#
# Prerequisites (the script installs nothing and needs no network): a CUDA GPU; this repo's
# .venv created on the machine with a CUDA build of torch (`python3 -m venv .venv &&
# .venv/bin/pip install torch` with the CUDA wheel, then `.venv/bin/pip install -e . -e
# plugins/sft -e plugins/dpo`, as CONTRIBUTING.md's set-up); flash-attn optional (its rows are
# reported as not run without it). Models and data are built locally with random weights.
#
#     bash benchmarks/gpu.sh [OUTPUT.md]        # default: gpu-benchmark.md
#     SMOKE=1 bash benchmarks/gpu.sh            # tiny shapes, on the CPU too: checks the script
#
# Every step runs under `timeout`, and together they stop before 8 minutes (480 s); a step cut
# short leaves the rows it finished in the table, and says it was cut short.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-gpu-benchmark.md}"
PYTHON="${PYTHON:-.venv/bin/python}"
# all steps together, leaving room for a step's 10 s kill grace and the table: under 8 minutes
BUDGET_S=$((${BUDGET_S:-450} < 450 ? ${BUDGET_S:-450} : 450))
KERNELS_S=220 # step 1's share; step 2 splits the rest between its two paths
START=$SECONDS
SMOKE="${SMOKE:-}"

remaining() { echo $((BUDGET_S - (SECONDS - START))); }
at_most() { local left; left=$(remaining); echo $((left < $1 ? left : $1)); }

if [[ -z "$SMOKE" ]]; then
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "benchmarks/gpu.sh: no NVIDIA GPU here (nvidia-smi finds none); nothing measured." >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "benchmarks/gpu.sh: $PYTHON's torch sees no CUDA device (a CPU build?)." >&2
        exit 1
    fi
fi

WORK="$(mktemp -d -t align-gpu-XXXXXX)"  # the steps' logs, kept
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" TOKENIZERS_PARALLELISM=false

{
    echo "# align on one GPU"
    echo
    echo "- $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    if [[ -n "$SMOKE" ]]; then
        echo "- SMOKE: tiny shapes (1-2 layers, 64 wide, short sequences): a check of the script, no figures"
    else
        echo "- $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
    fi
    "$PYTHON" -c 'import torch, transformers; print(f"- torch {torch.__version__}, transformers {transformers.__version__}")'
    echo
} >"$OUT"

# -- 1. attention kernels on packed batches --------------------------------------------------------
cat >"$WORK/attention_bench.py" <<'PY'
"""Forward + backward of the decoder on packed batches under each attention path (gpu.sh, 1)."""

import os
import random
import statistics
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

from align.data.batching import sequence_batch
from align.data.packing import pack
from align.model.attention import MASKLESS_ROW_TOKENS, packed_attention

SMOKE = bool(os.environ.get("SMOKE"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = {  # Qwen2.5-0.5B, as against_trl.py's real workload
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
}  # fmt: skip
PROMPT, ANSWER, EXAMPLES, ROW_TOKENS, WARMUP, TIMED = (768, 896), (256, 320), 16, MASKLESS_ROW_TOKENS, 2, 5
if SMOKE:
    SHAPE.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, vocab_size=1000)  # fmt: skip
    PROMPT, ANSWER, EXAMPLES, ROW_TOKENS, WARMUP, TIMED = (24, 32), (8, 12), 4, 128, 1, 1


def examples(shared):
    """DPO pairs (a prompt, two answers) or SFT sequences (a prompt, one answer): groups."""
    rng = random.Random(0)
    draw = lambda span: [rng.randrange(10, SHAPE["vocab_size"]) for _ in range(rng.randint(*span))]  # noqa: E731
    groups = []
    for _ in range(EXAMPLES):
        prompt = draw(PROMPT)
        answers = [draw(ANSWER) for _ in range(2 if shared else 1)]
        groups.append([(prompt + a, [0] * len(prompt) + [1] * len(a)) for a in answers])
    return groups


def batch_for(groups, layout):
    if layout == "padded":
        rows = [{"input_ids": i, "completion_mask": m} for g in groups for i, m in g]
        return sequence_batch(rows, 0)
    filled = layout.endswith("filled")
    return pack(groups, 0, dense_mask=layout.startswith("dense"),
                row_tokens=ROW_TOKENS if filled else None)  # fmt: skip


def inputs(model, batch):
    if "targets" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {"input_ids": batch["input_ids"], **packed_attention(batch, "", model)}


def real_tokens(batch):
    return batch["token_mask"] if "token_mask" in batch else batch["attention_mask"].bool()


def step(model, batch):
    real = real_tokens(batch)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        hidden = model.model(**inputs(model, batch), use_cache=False).last_hidden_state
    (hidden.float().pow(2).mean(-1) * real).sum().backward()


def measure(model, batch):
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    times = []
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(WARMUP + TIMED):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step(model, batch)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    seconds = statistics.median(times[WARMUP:])
    real = int(real_tokens(batch).sum())
    rows, width = batch["input_ids"].shape
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    return f"{rows} × {width} | {100 * real / (rows * width):.0f}% | {1000 * seconds:.0f} | {real / seconds:,.0f} | {peak:.1f}"


def flash_name():
    if is_flash_attn_3_available():
        return "flash_attention_3"
    return "flash_attention_2" if is_flash_attn_2_available() else None


def main():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True)).to(DEVICE).train()
    cuda = DEVICE == "cuda"
    print("| workload | layout | attention | rows × T | real tokens | ms / step | tokens/s | peak GiB |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for workload, shared in (("DPO pairs", True), ("SFT sequences", False)):
        groups = examples(shared)
        plans = [
            ("padded", "sdpa", "padded rows"),
            ("dense, capped", "sdpa", "packed, rows capped at the widest group, dense mask"),
            ("dense, filled", "sdpa", f"packed, rows filled to {ROW_TOKENS}, dense mask"),
            ("ids, capped", "flex_attention", "packed, rows capped, block mask"),
            ("ids, filled", "flex_attention", f"packed, rows filled to {ROW_TOKENS}, block mask"),
        ]
        if not shared:
            plans.append(("ids, filled", flash_name(), f"packed, rows filled to {ROW_TOKENS}, varlen"))
        for layout, attention, words in plans:
            first = f"| {workload} | {words} | {attention or 'flash attention'} |"
            if attention is None:
                print(f"{first} not run: flash-attn is not installed | | | | |", flush=True)
                continue
            if attention == "flex_attention" and not cuda:
                print(f"{first} not run: FlexAttention's backward needs CUDA | | | | |", flush=True)
                continue
            try:
                model.set_attn_implementation(attention)
                print(f"{first} {measure(model, batch_for(groups, layout))} |", flush=True)
            except Exception as exc:  # a row that cannot run says why; the others go on
                message = f"{type(exc).__name__}: {exc}".replace("|", "/").splitlines()[0][:160]
                print(f"{first} failed: {message} | | | | |", flush=True)
            finally:
                model.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
PY

echo "## 1. Attention kernels on packed batches" >>"$OUT"
cat >>"$OUT" <<'MD'

The decoder of the Qwen2.5-0.5B shape (random weights, bf16 autocast), forward + backward of 16
examples: DPO pairs (a 768-896-token prompt shared by two 256-320-token answers) or SFT sequences
(a prompt and one answer). `real tokens`: the share of the rows' positions that are not padding.
Times: the median of 5 steps after 2 warm-up steps (FlexAttention compiles in those).

MD
limit=$(at_most "$KERNELS_S")
SMOKE="$SMOKE" timeout --signal=INT --kill-after=10 "$limit" \
    "$PYTHON" "$WORK/attention_bench.py" >"$WORK/attention_bench.md" 2>"$WORK/attention_bench.err"
status=$?
cat "$WORK/attention_bench.md" >>"$OUT"
if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo -e "\n(cut short at ${limit} s: the rows above are the ones that finished)" >>"$OUT"
elif [[ $status -ne 0 ]]; then
    echo -e "\n(failed, exit $status: $(tail -1 "$WORK/attention_bench.err"))" >>"$OUT"
fi

# -- 2. the real workload end to end --------------------------------------------------------------
{
    echo
    echo "## 2. The real workload: align, dense-mask path against the CUDA packed path"
    echo
    echo "| objective | attention | status | s/step | examples/s | tokens/s | wall s |"
    echo "| --- | --- | --- | ---: | ---: | ---: | ---: |"
} >>"$OUT"
REAL_ARGS=(--workloads real --models qwen2.5-0.5b --precisions bf16 --objectives dpo,sft
    --align-only --repeat 1 --no-largest)
[[ -n "$SMOKE" ]] && REAL_ARGS+=(--smoke)
for attention in sdpa auto; do
    left=$(remaining)
    if ((left < 30)); then
        echo "| dpo, sft | $attention | not run: the 8-minute budget is spent | | | | |" >>"$OUT"
        continue
    fi
    # the remaining time, split between this path and the next
    limit=$([[ $attention == sdpa ]] && echo $((left / 2)) || echo "$left")
    json="$WORK/real-$attention.json"
    ALIGN_PACKED_ATTENTION=$attention timeout --signal=INT --kill-after=10 "$limit" \
        "$PYTHON" benchmarks/against_trl.py "${REAL_ARGS[@]}" --json "$json" \
        >"$WORK/real-$attention.log" 2>&1
    status=$?
    "$PYTHON" - "$json" "$attention" "$status" "$limit" >>"$OUT" <<'PY'
import json, sys
from pathlib import Path

path, attention, status, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
runs = json.loads(Path(path).read_text())["runs"] if Path(path).exists() else []
for r in runs:
    if r.get("status", "ok") != "ok":
        print(f"| {r['objective']} | {attention} | {r.get('status')} {r.get('error', '')[:80]} | | | | |")
        continue
    print(f"| {r['objective']} | {attention} | ok | {r['s_per_step']:.3f} | {r['examples_per_s']:.2f} "
          f"| {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} |")
if status:
    why = f"cut short at {limit} s" if status in (124, 137) else f"exit {status}"
    print(f"| {'(rest)' if runs else 'dpo, sft'} | {attention} | not finished: {why} | | | | |")
PY
done

echo -e "\nTotal: $((SECONDS - START)) s. Logs: $WORK." >>"$OUT"
echo "wrote $OUT ($((SECONDS - START)) s)"
