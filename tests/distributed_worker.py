"""Run under ``torchrun --nproc_per_node 2``: each process takes half of the examples.

Writes, from rank 0, the reduced metrics, the step loss and the accumulated gradients
(which must equal one process on the whole batch) to the directory given as argv[2].
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from align import default_batch
from align.data.examples import tokenize_records
from align.data.records import read_records
from align.loop.metrics import MetricSums
from align.loop.step import accumulate_gradients
from align_sft.loss import sft_counts, sft_loss


def main(model_dir: str, out: str, data: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, world
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_records(
        read_records(data), "prompt_completion", tokenizer, 64, "error", "train"
    )
    mine = examples[4 * rank : 4 * rank + 4]
    model = accelerator.prepare(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    )
    sums = MetricSums()
    batch = default_batch("prompt_completion", mine, tokenizer.pad_token_id)
    loss = accumulate_gradients(
        model,
        [(batch, sft_counts(batch, "token"))],
        lambda b: (sft_loss(model, b, "token"), {}),
        accelerator,
        sums,
    )
    # Uneven counts per process; a metric only rank 1 reports.
    uneven = MetricSums()
    uneven.add("uneven", 3.0 if rank == 0 else 1.0, 1 if rank == 0 else 3)
    if rank == 1:
        uneven.add("only_rank1", 2.0, 2)
    reduced = {
        **uneven.reduce(accelerator),
        "logged_loss": sums.reduce(accelerator)["loss"],
        "step_loss": loss,
    }
    if accelerator.is_main_process:
        grads = {
            n: p.grad.contiguous()
            for n, p in accelerator.unwrap_model(model).named_parameters()
            if p.grad is not None
        }
        save_file(grads, str(Path(out) / "grads.safetensors"))
        (Path(out) / "metrics.json").write_text(json.dumps(reduced))
    accelerator.wait_for_everyone()
    # The DDP wrapper freed first: its reducer, left as the group's last holder, would destroy
    # it holding the GIL and can hang (align.loop.launch.drop_ddp_wrapper).
    accelerator._models.clear()
    model = None  # (the loss lambda shares this variable)
    accelerator.state.destroy_process_group()  # or gloo's threads may abort the exit


if __name__ == "__main__":
    main(*sys.argv[1:4])
