"""``align chat`` and ``align generate``: try a trained model. Torch is imported only when a
command runs."""

from __future__ import annotations

import sys
import typing
from collections import Counter
from typing import Any

import click

from align.errors import AlignError
from align.options import TrainConfig
from align.tools.chat import SAMPLING_OPTIONS

from .options import option_for

ALIASES = {"max_completion_length": "--max-new-tokens"}  # transformers' and LLaMA-Factory's name
HELP = {"seed": "Seed for sampling (torch is seeded once, at the start)."}


def _run_flag(name: str) -> Any:
    """``align run``'s flag for the core option ``name``, with the help said for sampling here
    (not "On-policy objectives: …") and an alias where one is known."""
    option = option_for(name)(lambda: None).__click_params__[0]
    text = (option.help or "").removeprefix("On-policy objectives: ")
    if name in HELP:
        default = text.find(" [default:")
        text = HELP[name] + (text[default:] if default >= 0 else "")
    option.help = text[:1].upper() + text[1:]
    if name in ALIASES:
        option.opts.append(ALIASES[name])

    def decorator(func: Any) -> Any:
        func.__dict__.setdefault("__click_params__", []).append(option)
        return func

    return decorator


def model_options(func: Any) -> Any:
    """What ``align chat`` and ``align generate`` share: the model, sampling and loading."""
    decorators = [
        click.argument("run_or_model"),
        *(_run_flag(name) for name in SAMPLING_OPTIONS),
        click.option(
            "--precision",
            type=click.Choice(typing.get_args(TrainConfig.model_fields["precision"].annotation)),
            default="no",
            show_default=True,
            help="Precision the weights are loaded in: no (float32), bf16 or fp16.",
        ),
        _run_flag("trust_remote_code"),
        click.option("--system", metavar="TEXT", help="System message (chat template models)."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _prepare(run_or_model: str, options: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The source, tokenizer and sampling settings, every argument checked before the model
    loads; the source said on stderr."""
    from align.tools import chat as tools

    settings = tools.sampling(**{name: options.pop(name) for name in SAMPLING_OPTIONS})
    source = tools.resolve_source(run_or_model)
    click.echo(f"Model: {source.note}", err=True)
    tokenizer = tools.load_tokenizer(source, bool(options["trust_remote_code"]))
    return source, tokenizer, settings


def _load(source: Any, tokenizer: Any, settings: Any, options: dict[str, Any]) -> Any:
    from align.tools import chat as tools

    loaded = tools.load(
        source, bool(options["trust_remote_code"]), options["precision"], tokenizer=tokenizer
    )
    return tools.Completer(loaded, settings)


@click.command()
@model_options
def chat(run_or_model: str, **options: Any) -> None:
    """Chat with a model: a run directory (its final/, or while it has none its newest
    checkpoint), a checkpoint, a model or LoRA adapter directory, or a hub id.

    Each message is rendered with the whole conversation by the tokenizer's chat template and
    the reply streams as it is generated. /clear forgets the conversation, /system TEXT sets
    the system message, /exit or Ctrl-D quits; Ctrl-C stops a reply. A tokenizer without a
    chat template continues each line as plain text, without history.
    """
    try:
        from align.tools import chat as tools

        source, tokenizer, settings = _prepare(run_or_model, options)
        if options["system"] and not tools.has_chat_template(tokenizer):
            raise click.UsageError("--system needs a tokenizer with a chat template")
        completer = _load(source, tokenizer, settings, options)
        conversation = tools.Conversation(completer, system=options["system"])
        interactive = sys.stdin.isatty()
        if interactive:
            import readline  # noqa: F401 (line editing and ↑ for earlier lines, in input())

        def read(prompt: str) -> str:
            line = input(prompt)
            if not interactive:  # piped input: show what was read, as a terminal would
                click.echo(line)
            return line

        tools.chat_loop(conversation, read, lambda text: click.echo(text, nl=False))
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@model_options
@click.option(
    "--prompt",
    "texts",
    multiple=True,
    metavar="TEXT",
    help="A prompt, sent as a user message through the chat template (--raw: as plain text). "
    "Repeatable.",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=True),
    help="Prompts file (.jsonl, .json, .csv, .parquet) of prompt-only records, as align run "
    "reads them: `prompt` a string (continued as plain text) or a list of chat messages.",
)
@click.option("--raw", is_flag=True, help="Send --prompt texts as plain text, no chat template.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="Write JSON Lines (prompt and completion per line) instead of printing.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Prompts generated together.",
)
def generate(
    run_or_model: str,
    texts: tuple[str, ...],
    data: str | None,
    raw: bool,
    output: str | None,
    overwrite: bool,
    batch_size: int,
    **options: Any,
) -> None:
    """Complete prompts with a model (RUN_OR_MODEL as for align chat): --prompt TEXT
    (repeatable) and/or --data FILE; printed, or written to --output as JSON Lines."""
    try:
        from align.tools import chat as tools

        if not texts and not data:
            raise click.UsageError("give --prompt TEXT (repeatable) or --data FILE")
        if data:
            tools.check_data_file(data)
        target = tools.OutputFile(output, overwrite, (data,) if data else ()) if output else None
        source, tokenizer, settings = _prepare(run_or_model, options)
        if raw and options["system"]:
            raise click.UsageError("--system needs the chat template; --raw leaves it out")
        if not tools.has_chat_template(tokenizer) and texts and not raw:
            click.echo(
                "Note: the tokenizer has no chat template; --prompt texts are continued as "
                "plain text.",
                err=True,
            )
        prompts = tools.text_prompts(list(texts), tokenizer, options["system"], raw)
        if data:
            prompts += list(tools.data_prompts(data, tokenizer))
        completer = _load(source, tokenizer, settings, options)
        for prompt in prompts:  # each fits the model's context, before any is generated
            completer.room(len(prompt.ids), prompt.where)
        results = _generate(completer, prompts, batch_size, show=target is None)
        if target is not None:
            count = target.write(tools.completion_record(p, c) for p, c in results)
            click.echo(f"Wrote {count} completions to {target.path}", err=True)
        notes = Counter(tools.ending_note(c, completer) for _, c in results)
        for note, count in sorted((n, c) for n, c in notes.items() if n):
            click.echo(f"{count} of {len(results)} completions ended without EOS: {note}", err=True)
    except AlignError as exc:
        raise click.ClickException(str(exc)) from None


def _generate(completer: Any, prompts: list[Any], batch_size: int, show: bool) -> list[Any]:
    """Each prompt with its completion, a batch at a time; printed as they come when ``show``,
    else with a progress bar on stderr."""
    from tqdm.auto import tqdm

    from align.tools.chat import batches, shown

    results = []
    with tqdm(total=len(prompts), unit="prompt", disable=show, file=sys.stderr) as bar:
        for batch in batches(iter(prompts), batch_size):
            completions = completer.complete([p.ids for p in batch])
            for prompt, completion in zip(batch, completions, strict=True):
                results.append((prompt, completion))
                if show:
                    click.echo(f"> {shown(prompt)}\n{completion.text}\n")
            bar.update(len(batch))
    return results
