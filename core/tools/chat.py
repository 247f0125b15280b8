"""``align chat`` and ``align generate``: a trained model tried with its chat template.

What to load (:func:`resolve_source`): an align run directory (its ``final/``, or while it has
none its newest complete checkpoint), a checkpoint, a model directory, a LoRA adapter directory
(loaded onto the base model its ``adapter_config.json`` names, as ``align merge`` does) or a hub
id (from the cache when the hub is unreachable). Weights load through safetensors only, and
model code from the hub runs only when asked (``trust_remote_code``).

Sampling takes ``align run``'s on-policy options, validated by the same ``TrainConfig`` fields
and turned into the same ``GenerationConfig`` (temperature 0: greedy). The model's own
``generation_config`` sampling values do not apply; its extra EOS tokens do.

A conversation is rendered by the tokenizer's chat template with the whole history and the
generation prompt; the reply streams token by token (transformers' ``TextIteratorStreamer``,
``generate`` in a thread), and Ctrl-C stops that reply, not the program. A tokenizer without a
chat template continues each line as plain text, without history.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import AlignError, ConfigError, DataError
from ..loop.rundir import CHECKPOINTS, read_record
from ..options import TrainConfig

# align run's options that set sampling here (TrainConfig's fields: descriptions, defaults and
# the ranges they are validated against).
SAMPLING_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_completion_length",
    "seed",
)
PRECISIONS = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Sampling:
    """How replies are sampled (``align run``'s on-policy options; ``seed`` seeds torch once)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float | None
    repetition_penalty: float
    max_completion_length: int
    seed: int


def sampling(**given: Any) -> Sampling:
    """The sampling settings: ``given`` values (None: not given) over ``align run``'s defaults,
    validated as ``align run`` validates them; an error names the flag."""
    values = {key: value for key, value in given.items() if value is not None}
    unknown = sorted(set(values) - set(SAMPLING_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown sampling option(s) {unknown}; known: {list(SAMPLING_OPTIONS)}")
    try:
        config = TrainConfig(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "sampling"
            problems.append(f"{flag}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("; ".join(problems)) from None
    return Sampling(**{key: getattr(config, key) for key in SAMPLING_OPTIONS})


# -- what to load ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """What :func:`load` loads: ``model`` (a directory or hub id: the weights, or an adapter's
    base), ``adapter`` (a LoRA adapter directory loaded onto it), ``tokenizer`` (where the
    tokenizer comes from) and ``note`` (which of a run's models was chosen, for the user)."""

    model: str
    adapter: str | None
    tokenizer: str
    note: str


def resolve_source(name: str) -> Source:
    """What ``RUN_OR_MODEL`` names. A run directory gives its ``final/``, or while the run has
    none its newest complete checkpoint (the note says so); a path that does not exist, or a
    hub id neither cached nor reachable, is a ConfigError. Imports no torch but to list a
    run's checkpoints."""
    from ..model.loading import check_model_source

    path = Path(name).expanduser()
    if path.is_dir():
        record = read_record(path)
        if record is not None:
            return _run_source(path, record)
        return _directory_source(path, _describe(path))
    if path.exists():
        raise ConfigError(
            f"{name} is a file; give a run directory, a model or LoRA adapter directory, or a "
            "hub id"
        )
    cached = _cached_adapter(name)
    if cached is not None:
        return _directory_source(cached, f"{name} (from the hub cache)")
    check_model_source(name, role="model")
    return Source(name, None, name, name)


def _run_source(out: Path, record: dict[str, Any]) -> Source:
    final = out / "final"
    if final.is_dir():
        return _directory_source(final, f"{final} (the run's final model)")
    from ..loop.resume import complete_checkpoints

    status = record.get("status", "unknown")
    found = complete_checkpoints(out)
    if not found:
        raise ConfigError(
            f"the run in {out} (status {status}) has no final/ and no complete checkpoint yet "
            "to chat with (checkpoints are written every 10 minutes of training by default, "
            "--save-minutes or --save-every N)"
        )
    step, checkpoint = found[-1]
    return _directory_source(
        checkpoint,
        f"{checkpoint}: the run in {out} has no final/ yet (status {status}), so its newest "
        f"complete checkpoint, step {step}",
    )


def _describe(path: Path) -> str:
    if path.parent.name == CHECKPOINTS and (path.parent.parent / "run.json").is_file():
        return f"{path} (checkpoint {path.name} of the run in {path.parent.parent})"
    return str(path)


def _directory_source(path: Path, note: str) -> Source:
    from ..model.loading import saved_sequence_classifier

    classifier = saved_sequence_classifier(path)
    if classifier is not None:
        raise ConfigError(reward_model_refusal(note, classifier))
    if (path / "adapter_config.json").is_file():
        from .merge import adapter_base

        base = adapter_base(path)
        tokenizer = path if (path / "tokenizer_config.json").is_file() else base
        return Source(base, str(path), str(tokenizer), f"{note}: a LoRA adapter on {base}")
    if (path / "config.json").is_file():
        return Source(str(path), None, str(path), note)
    raise ConfigError(
        f"{path} is neither an align run (run.json), a model directory (config.json) nor a LoRA "
        "adapter directory (adapter_config.json)"
    )


def reward_model_refusal(named: str, architecture: str) -> str:
    return (
        f"{named} is a reward model ({architecture}): it scores text and cannot generate; chat "
        "with or generate from a language model (the policy), and score text with the reward "
        "model (AutoModelForSequenceClassification)"
    )


def _cached_adapter(name: str) -> Path | None:
    """The hub cache's snapshot of an adapter repository ``name``, or None."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    try:
        found = try_to_load_from_cache(name, "adapter_config.json")
    except HFValidationError:  # not a hub id
        return None
    return Path(found).parent if isinstance(found, str) else None


# -- loading --------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A model ready to generate: in eval mode on ``device`` (CUDA when there is one)."""

    model: Any
    tokenizer: Any
    source: Source
    device: Any


def load_tokenizer(source: Source, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``source``, with a pad token (EOS when it has none)."""
    from types import SimpleNamespace

    from ..loop.setup import load_tokenizer as load

    return load(SimpleNamespace(model=source.tokenizer, trust_remote_code=trust_remote_code))


def load(
    source: Source,
    trust_remote_code: bool = False,
    precision: str = "no",
    tokenizer: Any = None,
) -> Loaded:
    """Load ``source``'s model (safetensors only; an adapter onto its base, unmerged) in
    ``precision`` (``no``: float32, ``bf16``, ``fp16``) and its tokenizer."""
    import torch
    import transformers

    from ..loop.quiet import quiet_third_party
    from ..model.loading import load_causal_lm
    from .merge import load_with_adapter

    quiet_third_party()  # PEFT's is_gradient_checkpointing FutureWarning on adapters
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    dtype = getattr(torch, PRECISIONS[precision])
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" says nothing here
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source, trust_remote_code)
    if source.adapter is not None:
        model, _base = load_with_adapter(
            source.adapter, source.model, trust_remote_code, dtype=dtype
        )
    else:
        model = load_causal_lm(source.model, trust_remote_code, dtype=dtype)
    saved_as = [a for a in model.config.architectures or [] if a.endswith("SequenceClassification")]
    if saved_as:  # a hub id of a reward model: its config, read by from_pretrained, says so
        raise ConfigError(reward_model_refusal(source.note, saved_as[0]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return Loaded(model, tokenizer, source, device)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# -- generating -----------------------------------------------------------------------------------
@dataclass
class Completion:
    """One generated completion: its text (special tokens left out), its token ids (up to and
    including the first EOS), and how it ended."""

    text: str
    ids: list[int]
    ended: bool  # it ended with an EOS token
    stopped: bool = False  # Ctrl-C stopped it
    limit: int = 0  # the most new tokens it could have had

    @property
    def truncated(self) -> bool:
        return not self.ended and not self.stopped


class ContextFull(AlignError):
    """The prompt leaves no room for a reply in the model's context."""


class _StopOn:
    """A stopping criterion that ends generation once ``event`` is set (Ctrl-C)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class Completer:
    """Generates completions of token-id prompts with ``sampling``: batched
    (:meth:`complete`, ``model.generate`` as ``align run``'s on-policy objectives call it) or
    one streamed (:meth:`stream`). Torch's generator is seeded once, at the start."""

    def __init__(self, loaded: Loaded, sampling: Sampling) -> None:
        import torch

        from ..rollout.generate import eos_token_ids

        self.loaded = loaded
        self.sampling = sampling
        self.eos = eos_token_ids(loaded.model, loaded.tokenizer)
        self.context = getattr(loaded.model.config, "max_position_embeddings", None)
        torch.manual_seed(sampling.seed)

    def _request(self, prompts: list[list[int]], max_new_tokens: int) -> Any:
        from ..plugins.api import GenerationRequest

        s = self.sampling
        return GenerationRequest(
            model=self.loaded.model,
            tokenizer=self.loaded.tokenizer,
            prompts=prompts,
            num_generations=1,
            max_new_tokens=max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            eos_token_ids=self.eos,
            pad_token_id=self.loaded.tokenizer.pad_token_id,
            seed=s.seed,
        )

    def _completion(self, ids: list[int], limit: int, stopped: bool = False) -> Completion:
        from ..rollout.generate import cut_at_eos

        ids = cut_at_eos(ids, set(self.eos))
        text = self.loaded.tokenizer.decode(ids, skip_special_tokens=True)
        ended = bool(ids) and ids[-1] in self.eos
        return Completion(text, ids, ended, stopped, limit)

    def room(self, prompt_length: int, where: str = "the prompt") -> int:
        """The most new tokens a prompt of ``prompt_length`` may get: --max-completion-length,
        or less where the model's context (``max_position_embeddings``) ends first."""
        limit = self.sampling.max_completion_length
        if self.context:
            left = self.context - prompt_length
            if left <= 0:
                raise ContextFull(
                    f"{where} ({prompt_length} tokens) fills the model's context of "
                    f"{self.context} tokens"
                )
            limit = min(limit, left)
        return limit

    def complete(self, prompts: list[list[int]]) -> list[Completion]:
        """A completion of each prompt, generated together (left-padded), each as long as
        :meth:`room` allows for its own length (as if generated alone)."""
        import torch

        from ..rollout.generate import transformers_generate

        limits = [self.room(len(prompt)) for prompt in prompts]
        # A short prompt's room runs a longer one's padded row past the context: transformers
        # warns of it, but what a row generates past its own room is cut off here.
        quiet = logging.getLogger("transformers.generation.stopping_criteria")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with torch.no_grad():
                rows = transformers_generate(self._request(prompts, max(limits)))
        finally:
            quiet.setLevel(level)
        return [
            self._completion(row[:limit], limit) for row, limit in zip(rows, limits, strict=True)
        ]

    def stream(
        self,
        prompt: list[int],
        on_text: Callable[[str], None],
        on_start: Callable[[], None] | None = None,
    ) -> Completion:
        """Generate a completion of ``prompt``, handing its text to ``on_text`` as it comes
        (``on_start()`` first, once the prompt is known to fit the context). Ctrl-C
        (KeyboardInterrupt) stops it after the token being generated: the completion so far
        comes back with ``stopped`` set."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        from ..rollout.generate import generation_config

        limit = self.room(len(prompt))
        model = self.loaded.model
        ids = torch.tensor([prompt], device=self.loaded.device)
        streamer = TextIteratorStreamer(
            self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with torch.no_grad():
                    outcome["ids"] = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        generation_config=generation_config(self._request([prompt], limit)),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopOn(stop)]),
                    )
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
                streamer.end()

        if on_start is not None:
            on_start()
        thread = threading.Thread(target=work, name="align-chat-generate", daemon=True)
        thread.start()
        try:
            for text in streamer:
                on_text(text)
        except KeyboardInterrupt:
            stop.set()
        except BaseException:  # on_text failed (a closed pipe): generation stops too
            stop.set()
            _join(thread, stop)
            raise
        _join(thread, stop)
        if "error" in outcome:
            raise outcome["error"]
        return self._completion(outcome["ids"][0, len(prompt) :].tolist(), limit, stop.is_set())


def _join(thread: threading.Thread, stop: threading.Event) -> None:
    """Wait for the generating thread; a second Ctrl-C meanwhile only stops it again."""
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt:
            stop.set()


def ending_note(completion: Completion, completer: Completer) -> str | None:
    """Why a completion ended without EOS, for the user; None when it ended with one."""
    if completion.stopped:
        return "stopped (Ctrl-C)"
    if not completion.truncated:
        return None
    if completion.limit < completer.sampling.max_completion_length:
        return f"cut: the model's context of {completer.context} tokens is full"
    return f"cut at --max-completion-length ({completion.limit} tokens)"


# -- chatting -------------------------------------------------------------------------------------
@dataclass
class Conversation:
    """A chat: the history (``messages``, the system message aside) rendered with the chat
    template for each reply; without a chat template, each line is continued as plain text
    and no history is kept."""

    completer: Completer
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def templated(self) -> bool:
        return has_chat_template(self.completer.loaded.tokenizer)

    def prompt(self, text: str) -> list[dict[str, str]] | str:
        """What the reply to ``text`` is generated from: the messages, or the text alone."""
        if not self.templated:
            return text
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.messages, {"role": "user", "content": text}]

    def prompt_ids(self, text: str) -> list[int]:
        from ..data.tokenize import TokenizeError, tokenize_prompt

        try:
            return tokenize_prompt(self.completer.loaded.tokenizer, self.prompt(text), "messages")
        except TokenizeError as exc:  # a template's raise_exception (no system role, say)
            raise ConfigError(f"cannot render the conversation: {exc}") from None

    def reply(
        self,
        text: str,
        on_text: Callable[[str], None],
        on_start: Callable[[], None] | None = None,
    ) -> Completion:
        """Stream the reply to ``text`` (``on_start()`` once it is rendered and fits the
        context); it and the reply join the history unless Ctrl-C stopped it."""
        completion = self.completer.stream(self.prompt_ids(text), on_text, on_start)
        if self.templated and not completion.stopped:
            self.messages += [
                {"role": "user", "content": text},
                {"role": "assistant", "content": completion.text},
            ]
        return completion

    def clear(self) -> None:
        self.messages.clear()


BARE_COMMANDS = ("exit", "quit", "clear")
COMMANDS = "/clear (forget the conversation), /system TEXT (set the system message; /system alone removes it), /exit or Ctrl-D (quit), /help"  # noqa: E501


def chat_loop(
    conversation: Conversation,
    read: Callable[[str], str],
    write: Callable[[str], None],
) -> None:
    """Read lines with ``read(prompt)`` (``input``'s contract: EOFError at the end, Ctrl-C a
    KeyboardInterrupt) and write the replies with ``write`` as they stream, until /exit or the
    end of input. Ctrl-C while reading discards the line; an error about one message (a chat
    template that refuses it, a full context) is written and the chat goes on."""
    write(f"Commands: {COMMANDS}.\n")
    if not conversation.templated:
        write(
            "The tokenizer has no chat template: each line is continued as plain text, without "
            "the conversation's history.\n"
        )
    while True:
        try:
            line = read("\nYou: ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(/exit or Ctrl-D quits)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in BARE_COMMANDS:  # LLaMA-Factory's chat takes these without the slash
            text = "/" + text
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/clear":
                conversation.clear()
                write("History cleared.\n")
            elif command == "/system":
                conversation.system = rest.strip() or None
                write(
                    f"System message: {conversation.system}\n"
                    if conversation.system
                    else "No system message.\n"
                )
            elif command == "/help":
                write(f"Commands: {COMMANDS}.\n")
            else:
                write(f"Unknown command {command}. Commands: {COMMANDS}.\n")
            continue
        try:
            completion = conversation.reply(text, write, lambda: write("Assistant: "))
        except (ConfigError, ContextFull) as exc:
            hint = " (/clear starts a new conversation)" if isinstance(exc, ContextFull) else ""
            write(f"Error: {exc}{hint}\n")
            continue
        note = ending_note(completion, conversation.completer)
        if completion.stopped:
            note += ": this exchange is left out of the history"
        write(f"\n[{note}]\n" if note else "\n")


# -- prompts for align generate -------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """A prompt to complete: as given (``value``: a string or messages), its token ids, and
    where it comes from (``--prompt 2``, ``prompts.jsonl, line 3``)."""

    value: Any
    ids: list[int]
    where: str


def text_prompts(
    texts: list[str], tokenizer: Any, system: str | None = None, raw: bool = False
) -> list[Prompt]:
    """``--prompt`` texts: each a user message under the chat template (after ``system``), or
    plain text with ``raw`` or a tokenizer without a template."""
    from ..data.tokenize import TokenizeError, tokenize_prompt

    prompts = []
    for number, text in enumerate(texts, start=1):
        where = f"--prompt {number}" if len(texts) > 1 else "--prompt"
        if raw or not has_chat_template(tokenizer):
            value: Any = text
        else:
            head = [{"role": "system", "content": system}] if system else []
            value = [*head, {"role": "user", "content": text}]
        try:
            prompts.append(Prompt(value, tokenize_prompt(tokenizer, value, "prompt"), where))
        except TokenizeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return prompts


def data_prompts(path: str, tokenizer: Any) -> Iterator[Prompt]:
    """The prompts of a data file as ``align run`` reads them in the ``prompt_only`` format
    (a string: plain text; messages: the chat template with its generation prompt); a bad
    record is a DataError naming the file, the line and the field."""
    from ..data.formats import BUILTIN
    from ..data.records import iter_records
    from ..data.tokenize import TokenizeError, tokenize_prompt

    groups = BUILTIN["prompt_only"].groups
    for record in iter_records(path):
        group = groups(record)
        try:
            ids = tokenize_prompt(tokenizer, group.prompt, "prompt")
        except TokenizeError as exc:
            raise record.error(str(exc), exc.field) from None
        yield Prompt(group.prompt, ids, f"{record.source}, {record.location}")


def completion_record(prompt: Prompt, completion: Completion) -> dict[str, Any]:
    """A line of ``--output``: the prompt as given and its completion, as messages when the
    prompt is messages (TRL's conversational prompt-completion records, which align trains on)."""
    if isinstance(prompt.value, list):
        return {
            "prompt": prompt.value,
            "completion": [{"role": "assistant", "content": completion.text}],
        }
    return {"prompt": prompt.value, "completion": completion.text}


def shown(prompt: Prompt) -> str:
    """A prompt as ``align generate`` prints it: the text, or its last message's content."""
    if isinstance(prompt.value, list):
        return str(prompt.value[-1].get("content", ""))
    return str(prompt.value)


class OutputFile:
    """``--output FILE``, written whole or not at all: JSON Lines into a temporary sibling,
    renamed into place when every completion is in (an existing file only with
    ``overwrite``)."""

    def __init__(self, path: str, overwrite: bool = False, inputs: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        for given in inputs:
            if Path(given).exists() and self.path.resolve() == Path(given).resolve():
                raise ConfigError(f"--output {path} is the input file {given}")
        if self.path.is_dir():
            raise ConfigError(f"--output {path} is a directory; give a file (JSON Lines)")
        if self.path.exists() and not overwrite:
            raise ConfigError(f"--output {path} exists; pass --overwrite to replace it")
        if not self.path.parent.is_dir():
            raise ConfigError(f"--output {path}: no such directory {self.path.parent}")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")

    def write(self, records: Iterator[dict[str, Any]]) -> int:
        count = 0
        try:
            with open(self.tmp, "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    count += 1
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return count


def batches(items: Iterator[Prompt], size: int) -> Iterator[list[Prompt]]:
    batch: list[Prompt] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_data_file(path: str) -> None:
    """Refuse a missing ``--data`` file before anything is loaded."""
    if not Path(path).exists():
        raise DataError("no such file or directory", source=path)
