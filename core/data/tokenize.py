"""Tokenising text and conversations with their loss masks.

Prompt and completion are tokenised *jointly* and the completion located through the fast
tokenizer's character offsets, so the completion is tokenised in context. For conversations,
the trained span of each assistant turn is found by rendering the prefix through the chat
template, so templates without generation markers work; a template that renders a prefix
differently from the full conversation is an error, never a silent fallback.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class TokenizeError(ValueError):
    """A record that cannot be tokenised; ``field`` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class Tokenized:
    """Token ids and the mask of the tokens the loss trains on (1 = trained)."""

    input_ids: list[int]
    completion_mask: list[int]


def tokenize_prompt_completion(tokenizer: Any, prompt: str, completion: str) -> Tokenized:
    """Tokenise ``prompt + completion`` jointly; train on the completion and an appended EOS."""
    text = prompt + completion
    ids, spans = _encode(tokenizer, text, add_special_tokens=True)
    mask = _mask_from_spans(ids, spans, [(len(prompt), len(text))], tokenizer, text, True)
    has_eos = ids[-1:] == [tokenizer.eos_token_id]
    if has_eos:  # added by the tokenizer itself (offsets (0, 0)): it still belongs to the loss
        mask[-1] = 1
    return _with_eos(tokenizer, Tokenized(ids, mask), has_eos=has_eos)


def tokenize_prompt(tokenizer: Any, prompt: Any, field: str = "prompt") -> list[int]:
    """A prompt to generate from: a string as the tokenizer encodes it (BOS, no EOS), or chat
    messages rendered with the chat template and its generation prompt (``<|assistant|>``)."""
    if isinstance(prompt, list):
        check_messages(prompt, field)
        _require_chat_template(tokenizer, field)
        text = _render(tokenizer, prompt, True, field)
        ids, _ = _encode(tokenizer, text, add_special_tokens=False, need_offsets=False)
    elif isinstance(prompt, str) and prompt.strip():
        ids, _ = _encode(tokenizer, prompt, add_special_tokens=True, need_offsets=False)
    else:
        kind = "an empty string" if isinstance(prompt, str) else type(prompt).__name__
        raise TokenizeError(f"expected a string or a list of messages, got {kind}", field)
    if ids[-1:] == [tokenizer.eos_token_id]:  # a tokenizer that appends EOS to every text
        ids = ids[:-1]
    if not ids:
        raise TokenizeError("the prompt has no tokens", field)
    return ids


def tokenize_text(tokenizer: Any, text: str) -> Tokenized:
    """Plain language modelling: every token is trained, EOS appended."""
    ids, _ = _encode(tokenizer, text, add_special_tokens=True, need_offsets=False)
    return _with_eos(
        tokenizer, Tokenized(ids, [1] * len(ids)), has_eos=ids[-1:] == [tokenizer.eos_token_id]
    )


def tokenize_conversation(
    tokenizer: Any, messages: Sequence[dict], trained_from: int = 0, field: str = "messages"
) -> Tokenized:
    """Render ``messages`` with the chat template; train assistant turns from ``trained_from``."""
    check_messages(messages, field)
    _require_chat_template(tokenizer, field)
    plain = all(m.keys() <= _PLAIN_KEYS for m in messages)  # checked once, not per render
    full = _render(tokenizer, messages, False, field, plain)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < trained_from:
            continue
        if i:
            prefix = _render(tokenizer, messages[:i], True, field, plain)
        else:
            prefix = _header(tokenizer, field)
        last = i == len(messages) - 1
        through = full if last else _render(tokenizer, messages[: i + 1], False, field, plain)
        if (
            not full.startswith(prefix)
            or not through.startswith(prefix)
            or not full.startswith(through)
        ):
            raise TokenizeError(
                f"the chat template renders the conversation up to message {i} differently "
                "from the full conversation, so the assistant tokens cannot be located",
                field,
            )
        spans.append((len(prefix), _turn_end(tokenizer, through, len(prefix))))
    if not spans:
        raise TokenizeError("no assistant message to train on", field)
    ids, offsets = _encode(tokenizer, full, add_special_tokens=False)
    mask = _mask_from_spans(ids, offsets, spans, tokenizer, full, False)
    # Templates end a turn with their own marker; EOS is added only when the last turn lacks it.
    has_eos = messages[-1]["role"] != "assistant"
    if not has_eos and tokenizer.eos_token_id is not None:
        if offsets is None:
            last_turn = _mask_from_spans(ids, offsets, spans[-1:], tokenizer, full, False)
            has_eos = any(ids[i] == tokenizer.eos_token_id for i, m in enumerate(last_turn) if m)
        else:
            import numpy as np

            turn = offsets.overlapping(spans[-1:])
            has_eos = bool((np.asarray(ids)[turn] == tokenizer.eos_token_id).any())
    return _with_eos(tokenizer, Tokenized(ids, mask), has_eos=has_eos)


def _require_chat_template(tokenizer: Any, field: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizeError(
            "conversational data needs a tokenizer with a chat template; this tokenizer has none",
            field,
        )


def check_messages(messages: Any, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizeError("expected a non-empty list of messages", field)
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise TokenizeError(f"expected a message object, got {type(message).__name__}", where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise TokenizeError(
                f"unknown role {role!r}; expected one of {', '.join(ROLES)}", f"{where}.role"
            )
        if not isinstance(content, str):
            raise TokenizeError(
                f"expected a string, got {type(content).__name__}", f"{where}.content"
            )


def _render(
    tokenizer: Any,
    messages: Sequence[dict],
    add_generation_prompt: bool,
    field: str,
    plain: bool | None = None,
) -> str:
    """The template's text; an empty prefix is rendered too (BOS, generation header).
    ``plain``: whether every message holds only ``role`` and ``content`` (None: look)."""
    try:
        render = _direct_renderer(tokenizer)
        if plain is None:
            plain = all(m.keys() <= _PLAIN_KEYS for m in messages)
        if render is not None and plain:
            return render(messages, add_generation_prompt)
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2 errors, raise_exception() in templates
        raise TokenizeError(f"the chat template failed: {exc}", field) from None


_PLAIN_KEYS = {"role", "content"}
_RENDERERS: Any = weakref.WeakKeyDictionary()  # tokenizer → (its template, renderer or None)
_PROBE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <b>there</b> {{ x }}"},
    {"role": "assistant", "content": " Hello.\n"},
]


def _direct_renderer(tokenizer: Any) -> Any:
    """The tokenizer's compiled template, called as ``apply_chat_template`` calls it, for
    messages of plain ``role`` and ``content`` strings: ``apply_chat_template`` spends two
    thirds of its time copying and normalising its input, and a conversation is rendered once
    per assistant turn. Used only where it renders a probe conversation exactly as
    ``apply_chat_template`` does; None otherwise (and for other messages)."""
    template = getattr(tokenizer, "chat_template", None)
    known = _RENDERERS.get(tokenizer)
    if known is not None and known[0] is template:
        return known[1]
    render = None
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.get_chat_template())
        if not isinstance(compiled.environment, ImmutableSandboxedEnvironment):
            raise TypeError("the template could change the messages it is given")
        special = {
            k: v if isinstance(v, str) else list(v) for k, v in tokenizer.special_tokens_map.items()
        }

        def render(messages: Sequence[dict], add_generation_prompt: bool) -> str:
            # transformers compiles templates in an immutable sandbox: they cannot change the
            # messages, so the caller's are passed, not copies
            return compiled.render(
                messages=list(messages),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **special,
            )

        for cut, prompt in ((3, False), (2, True), (1, True)):
            expected = tokenizer.apply_chat_template(
                _PROBE[:cut], tokenize=False, add_generation_prompt=prompt
            )
            if render(_PROBE[:cut], prompt) != expected:
                render = None
                break
    except Exception:  # a private helper gone or changed, a template that refuses the probe
        render = None
    _RENDERERS[tokenizer] = (template, render)
    return render


def _header(tokenizer: Any, field: str) -> str:
    """What the template writes before a conversation's opening assistant turn (BOS, header):
    templates cannot render an empty conversation, so render a marker and cut at it."""
    marker = "\x00align-marker\x00"
    text = _render(tokenizer, [{"role": "assistant", "content": marker}], False, field)
    if marker not in text:
        raise TokenizeError("the chat template drops the message content", field)
    return text[: text.index(marker)]


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, need_offsets: bool = True):
    """Token ids and, from a fast tokenizer, their character offsets (``_Offsets``; None from a
    slow one)."""
    offsets = None
    if getattr(tokenizer, "is_fast", False):  # the Rust tokenizer itself: no wrapper per text
        encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ids = encoding.ids
        if need_offsets:
            offsets = _Offsets(encoding)
    else:
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:  # the text already began with BOS
        ids = ids[1:]
        if offsets is not None:
            offsets.shift = 1
    return ids, offsets


class _Offsets:
    """A fast tokenizer's character offsets, read lazily: the tokens that overlap a span are
    found from the span's two ends (``char_to_token``) instead of converting every token's
    offsets to Python (a seventh of the time a record takes); all of them are read only where
    an end maps to no token."""

    def __init__(self, encoding: Any) -> None:
        self.encoding, self.shift = encoding, 0  # shift: tokens dropped from the start

    def overlapping(self, spans: Sequence[tuple[int, int]]) -> Any:
        """Whether each token (of non-zero width) overlaps one of the character spans."""
        import numpy as np

        count = len(self.encoding.ids) - self.shift
        mask = np.zeros(count, dtype=bool)
        for start, end in spans:
            # an empty span still marks a token that straddles its position: the slow path
            found = self._tokens(start, end) if end > start else None
            if found is None:
                return self.all_overlapping(spans)
            mask[max(0, found[0] - self.shift) : max(0, found[1] - self.shift)] = True
        return mask

    def _tokens(self, start: int, end: int) -> tuple[int, int] | None:
        encoding = self.encoding
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:
            return None
        # several tokens may share a character (the bytes of one emoji): take them all
        while first > self.shift and _overlaps(encoding.token_to_chars(first - 1), start, end):
            first -= 1
        total = len(encoding.ids)
        while last + 1 < total and _overlaps(encoding.token_to_chars(last + 1), start, end):
            last += 1
        return first, last + 1

    def all_overlapping(self, spans: Sequence[tuple[int, int]]) -> Any:
        """The same from every token's offsets."""
        import numpy as np

        pairs = itertools.chain.from_iterable(self.encoding.offsets)
        count = len(self.encoding.ids)
        offsets = np.fromiter(pairs, dtype=np.int64, count=2 * count).reshape(-1, 2)
        starts, ends = offsets[self.shift :, 0], offsets[self.shift :, 1]
        trained = np.zeros(len(starts), dtype=bool)
        for s_start, s_end in spans:  # overlapping the span: start < s_end and end > s_start
            trained |= (starts < s_end) & (ends > s_start)
        return trained & (ends > starts)


def _overlaps(chars: Any, start: int, end: int) -> bool:
    return chars is not None and chars[1] > chars[0] and chars[0] < end and chars[1] > start


def _turn_end(tokenizer: Any, through: str, start: int) -> int:
    """Where a rendered assistant turn ends: whitespace the template writes after its
    end-of-turn marker (a newline after EOS) is layout, not the answer."""
    stripped = through.rstrip()
    if stripped.endswith(tuple(tokenizer.all_special_tokens)):
        return max(start, len(stripped))
    return len(through)


def _mask_from_spans(
    ids, offsets, spans, tokenizer, text: str, add_special_tokens: bool
) -> list[int]:
    """1 for every token that overlaps a trained character span of ``text``."""
    if offsets is None:
        return _mask_without_offsets(ids, spans, tokenizer, text, add_special_tokens)
    return offsets.overlapping(spans).astype(int).tolist()


def _mask_without_offsets(ids, spans, tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Slow tokenizers give no offsets: the text before and through the one trained span must
    tokenise to prefixes of the whole, and the tokens between them are trained."""

    def refuse() -> TokenizeError:
        return TokenizeError(
            "this (slow) tokenizer gives no character offsets and tokenises the prompt "
            "differently alone than in context, or the data has several assistant turns; "
            "use a fast tokenizer"
        )

    if len(spans) > 1:
        raise refuse()
    bounds = []
    for end in spans[0]:
        part, _ = _encode(tokenizer, text[:end], add_special_tokens, need_offsets=False)
        appended = add_special_tokens and end < len(text)  # EOS a tokenizer adds to any text
        if appended and part[-1:] == [tokenizer.eos_token_id]:
            part = part[:-1]
        if ids[: len(part)] != part:
            raise refuse()
        bounds.append(len(part))
    return [0] * bounds[0] + [1] * (bounds[1] - bounds[0]) + [0] * (len(ids) - bounds[1])


def _with_eos(tokenizer: Any, tok: Tokenized, has_eos: bool) -> Tokenized:
    """Append a trained EOS, so the model learns to stop, unless one is already there."""
    if not has_eos and tokenizer.eos_token_id is not None:
        tok.input_ids.append(tokenizer.eos_token_id)
        tok.completion_mask.append(1)
    return tok
