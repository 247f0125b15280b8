"""Tokenising text and conversations with their loss masks.

Prompt and completion are tokenised *jointly* and the completion located through the fast
tokenizer's character offsets, so the completion is tokenised in context. For conversations,
the trained span of each assistant turn is found by rendering the prefix through the chat
template, so templates without generation markers work; a template that renders a prefix
differently from the full conversation is an error, never a silent fallback.
"""

from __future__ import annotations

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
    mask = _mask_from_spans(ids, spans, [(len(prompt), len(text))], tokenizer, prompt)
    return _with_eos(tokenizer, Tokenized(ids, mask), has_eos=ids[-1:] == [tokenizer.eos_token_id])


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
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizeError(
            "conversational data needs a tokenizer with a chat template; this tokenizer has none",
            field,
        )
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < trained_from:
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
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
        spans.append((len(prefix), len(through)))
    if not spans:
        raise TokenizeError("no assistant message to train on", field)
    ids, offsets = _encode(tokenizer, full, add_special_tokens=False)
    mask = _mask_from_spans(ids, offsets, spans, tokenizer, full[: spans[0][0]])
    last_turn = _mask_from_spans(ids, offsets, spans[-1:], tokenizer, full[: spans[-1][0]])
    # Templates end a turn with their own marker; EOS is added only when the last turn lacks it.
    has_eos = messages[-1]["role"] != "assistant" or any(
        m and t == tokenizer.eos_token_id for t, m in zip(ids, last_turn, strict=True)
    )
    return _with_eos(tokenizer, Tokenized(ids, mask), has_eos=has_eos)


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


def _render(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, need_offsets: bool = True):
    if need_offsets and not getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=add_special_tokens)
        return list(encoded["input_ids"]), None
    encoded = tokenizer(
        text, add_special_tokens=add_special_tokens, return_offsets_mapping=need_offsets
    )
    ids = list(encoded["input_ids"])
    if ids and ids[:2] == [tokenizer.bos_token_id] * 2:  # the text already began with BOS
        ids = ids[1:]
        return ids, (list(encoded["offset_mapping"])[1:] if need_offsets else None)
    return ids, (list(encoded["offset_mapping"]) if need_offsets else None)


def _mask_from_spans(ids, offsets, spans, tokenizer, prefix_text: str) -> list[int]:
    """1 for every token that overlaps a trained character span."""
    if offsets is None:  # slow tokenizer: the prefix's tokens must be a prefix of the whole
        prefix_ids, _ = _encode(tokenizer, prefix_text, add_special_tokens=True, need_offsets=False)
        if len(spans) > 1 or ids[: len(prefix_ids)] != prefix_ids:
            raise TokenizeError(
                "this (slow) tokenizer gives no character offsets and tokenises "
                "the prompt differently alone than in context; use a fast "
                "tokenizer"
            )
        return [0] * len(prefix_ids) + [1] * (len(ids) - len(prefix_ids))
    mask = []
    for start, end in offsets:
        trained = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        mask.append(int(trained))
    return mask


def _with_eos(tokenizer: Any, tok: Tokenized, has_eos: bool) -> Tokenized:
    """Append a trained EOS, so the model learns to stop, unless one is already there."""
    if not has_eos and tokenizer.eos_token_id is not None:
        tok.input_ids.append(tokenizer.eos_token_id)
        tok.completion_mask.append(1)
    return tok
