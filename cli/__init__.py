"""The ``align`` command line: one module per command group, gathered here. Listing commands
never import torch."""

from __future__ import annotations

import click

from .chat import chat, generate
from .compare import compare
from .listing import formats, objectives, plugins, rewards
from .options import RUN_FLAGS
from .run import inspect, prepare, run
from .tools import merge, new_plugin, plot, verify

__all__ = ["RUN_FLAGS", "cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="align-core", prog_name="align")
def cli() -> None:
    """align: fine-tune language models with objectives installed as plugins.

    \b
    align run                          train SFT on the embedded demo (under a minute on CPU)
    align run --objective minorsft     MinorSFT on the demo; also lora-sft, ift, dpo, kto, orpo
    align run --objective grpo         GRPO on the demo's sums, rewarded by --reward addition
    align run --objective sft --model DIR --data FILE.jsonl [--lora]
    align compare --objective sft,minorsft --lr 1e-4,1e-3 --eval new=F --eval kept=G
                                       a grid of runs; what each learned and forgot
    align chat RUN_DIR                 chat with a trained model (streamed, its chat template)
    align generate RUN_DIR --prompt T  complete prompts (or --data FILE) to stdout or --output
    align merge ADAPTER --output DIR   fold a LoRA adapter into its base model
    align inspect --objective dpo      the first examples, token by token, with loss masks
    align prepare --model M --data F   tokenise the data into the cache ahead of a run
    align plot RUN_DIR                 loss and metric curves of a run as a PNG
    align verify RUN_DIR               check a run's checkpoints and final/ byte for byte
    align new-plugin NAME              start a plugin project (--kind objective|reward|format)
    align objectives                   objectives installed, with their options
    align formats                      data formats: shape, columns, objectives each feeds
    align rewards                      reward functions (--reward) and generators
    align plugins                      plugins installed, their versions, hooks and errors
    """


for command in (
    run,
    compare,
    plugins,
    objectives,
    formats,
    rewards,
    chat,
    generate,
    merge,
    inspect,
    prepare,
    plot,
    verify,
):
    cli.add_command(command)
cli.add_command(new_plugin, "new-plugin")


def main() -> None:
    cli()
