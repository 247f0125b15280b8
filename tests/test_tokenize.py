"""Loss masks: completion-only and assistant-only training, EOS handling, no doubled BOS."""

import pytest

from align.data.tokenize import (
    TokenizeError,
    tokenize_conversation,
    tokenize_prompt_completion,
    tokenize_text,
)


def _trained_text(tokenizer, tok):
    return tokenizer.decode(
        [t for t, m in zip(tok.input_ids, tok.completion_mask, strict=True) if m]
    )


def test_prompt_completion_trains_completion_and_eos(tokenizer):
    tok = tokenize_prompt_completion(tokenizer, "What is 2 + 3?", " 2 + 3 = 5.")
    assert tok.input_ids[0] == tokenizer.bos_token_id
    assert tok.input_ids[-1] == tokenizer.eos_token_id and tok.completion_mask[-1] == 1
    assert _trained_text(tokenizer, tok) == " 2 + 3 = 5.</s>"
    untrained = [t for t, m in zip(tok.input_ids, tok.completion_mask, strict=True) if not m]
    assert tokenizer.decode(untrained) == "<s>What is 2 + 3?"


def test_token_straddling_the_boundary_is_trained(tokenizer):
    """A prompt ending in a space: byte-level BPE merges it into the first completion token
    (" 2"), which is trained, so no completion character is lost."""
    tok = tokenize_prompt_completion(tokenizer, "What is 2 + 3? ", "2 + 3 = 5.")
    assert _trained_text(tokenizer, tok) == " 2 + 3 = 5.</s>"


def test_completion_is_tokenised_in_context(tokenizer):
    """Joint tokenisation: the ids equal the whole text's, not prompt ids + completion ids."""
    prompt, completion = "What is 2 + 3?", " 2 + 3 = 5."
    tok = tokenize_prompt_completion(tokenizer, prompt, completion)
    assert tok.input_ids[:-1] == tokenizer(prompt + completion)["input_ids"]


def test_no_doubled_bos_and_no_doubled_eos(tokenizer):
    tok = tokenize_prompt_completion(tokenizer, "<s>Hi ", "there</s>")
    assert tok.input_ids.count(tokenizer.bos_token_id) == 1
    assert tok.input_ids.count(tokenizer.eos_token_id) == 1
    assert tok.input_ids[-1] == tokenizer.eos_token_id and tok.completion_mask[-1] == 1


def test_text_trains_every_token(tokenizer):
    tok = tokenize_text(tokenizer, "1 + 1 = 2.")
    assert all(tok.completion_mask) and tok.input_ids[-1] == tokenizer.eos_token_id


def test_conversation_trains_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2."},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4."},
    ]
    tok = tokenize_conversation(tokenizer, messages)
    # The demo template has no generation markers: masks come from rendering prefixes.
    assert _trained_text(tokenizer, tok) == "2.</s>4.</s>"  # not the newline after EOS
    assert tok.input_ids.count(tokenizer.bos_token_id) == 1
    # The template ends each turn with EOS, so none is appended.
    assert tok.input_ids.count(tokenizer.eos_token_id) == len(messages)


def test_prompt_messages_are_not_trained(tokenizer):
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    tok = tokenize_conversation(
        tokenizer, prompt + [{"role": "assistant", "content": "Bye."}], trained_from=len(prompt)
    )
    assert _trained_text(tokenizer, tok) == "Bye.</s>"


def test_template_that_renders_prefixes_differently_is_an_error(tokenizer):
    broken = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    broken.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(TokenizeError, match="renders the conversation"):
        tokenize_conversation(
            broken, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        )


def test_no_chat_template_is_an_error(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(TokenizeError, match="chat template"):
        tokenize_conversation(plain, [{"role": "assistant", "content": "b"}])


@pytest.mark.parametrize(
    "messages, field",
    [
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        (["hello"], "messages[0]"),
        ([], "messages"),
    ],
)
def test_bad_messages_name_the_field(tokenizer, messages, field):
    with pytest.raises(TokenizeError) as err:
        tokenize_conversation(tokenizer, messages)
    assert err.value.field == field


def test_conversation_without_assistant_is_an_error(tokenizer):
    with pytest.raises(TokenizeError, match="no assistant message"):
        tokenize_conversation(tokenizer, [{"role": "user", "content": "hi"}])


def test_eos_added_by_the_tokenizer_is_trained(tokenizer):
    from tokenizers import processors

    adds_eos = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_eos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tok = tokenize_prompt_completion(adds_eos, "Q:", " A.")
    assert tok.input_ids.count(eos) == 1 and tok.input_ids[-1] == eos
    assert tok.completion_mask[-1] == 1
    assert _trained_text(adds_eos, tok) == " A.</s>"


def test_conversation_opening_with_an_assistant_turn(tokenizer):
    tok = tokenize_conversation(tokenizer, [{"role": "assistant", "content": "Hi."}])
    assert _trained_text(tokenizer, tok) == "Hi.</s>"  # not BOS, not the header


def test_template_errors_become_tokenize_errors(tokenizer):
    strict = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    messages = [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(TokenizeError, match="System role not supported") as err:
        tokenize_conversation(strict, messages)
    assert err.value.field == "messages"


def test_slow_tokenizer_without_offsets():
    """ByT5 is a slow (Python) tokenizer that appends EOS itself: masks come from the prompt's
    own tokens, which must be a prefix of the whole."""
    from transformers import ByT5Tokenizer

    byt5 = ByT5Tokenizer()
    tok = tokenize_prompt_completion(byt5, "Q: 1 + 1?", " 2.")
    assert tok.input_ids.count(byt5.eos_token_id) == 1 and tok.input_ids[-1] == byt5.eos_token_id
    assert _trained_text(byt5, tok) == " 2.</s>"
    assert (
        byt5.decode([t for t, m in zip(tok.input_ids, tok.completion_mask, strict=True) if not m])
        == "Q: 1 + 1?"
    )


def test_slow_tokenizer_trains_only_the_assistant_turn():
    from transformers import ByT5Tokenizer

    byt5 = ByT5Tokenizer()
    byt5.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "bye"},
    ]
    tok = tokenize_conversation(byt5, messages)
    assert _trained_text(byt5, tok) == "yo</s>"
    with pytest.raises(TokenizeError, match="several assistant turns"):
        tokenize_conversation(byt5, [*messages, {"role": "assistant", "content": "ok"}])


def test_template_without_end_marker_keeps_its_newline_trained(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = tokenize_conversation(
        plain, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "yo"}]
    )
    # Without a generation prompt the turn's header cannot be told from its content.
    assert _trained_text(plain, tok) == "assistant: yo\n</s>"


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM_FIRST = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}"
    "[SYS]{{ messages[0]['content'] }}[/SYS]{% else %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template", [None, CHATML, SYSTEM_FIRST])
def test_templates_render_directly_as_apply_chat_template_does(tokenizer, template):
    """Plain messages are rendered by the compiled template itself (apply_chat_template spends
    most of its time copying its input): the text must be apply_chat_template's."""
    import copy

    from align.data.tokenize import _direct_renderer, _render

    tok = copy.deepcopy(tokenizer)
    if template is not None:
        tok.chat_template = template
    assert _direct_renderer(tok) is not None
    conversation = [
        {"role": "system", "content": "Be {{ brief }} & exact."},
        {"role": "user", "content": "  Hi <|im_end|> </s>\n"},
        {"role": "assistant", "content": "Hello ünïcode 🙂\n\n"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "{% raw %}"},
    ]
    for cut in range(1, len(conversation) + 1):
        for prompt in (False, True):
            expected = tok.apply_chat_template(
                conversation[:cut], tokenize=False, add_generation_prompt=prompt
            )
            assert _render(tok, conversation[:cut], prompt, "messages") == expected


def test_a_template_the_probe_tells_apart_is_rendered_by_apply_chat_template(tokenizer):
    """Messages with keys other than role and content, and templates whose direct rendering
    differs on the probe, go through apply_chat_template."""
    import copy

    from align.data.tokenize import _direct_renderer, _render

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['thinking'] or '' }}{{ m['content'] }}{% endfor %}"
    )
    messages = [{"role": "assistant", "content": "a", "reasoning_content": "why"}]
    expected = tok.apply_chat_template(messages, tokenize=False)
    assert _render(tok, messages, False, "messages") == expected == "whya"
    tok.chat_template = "{{ messages | length }}{{ tools }}"
    assert _direct_renderer(tok) is not None  # tools=None renders as apply_chat_template's


def test_tokens_overlapping_a_span_are_found_from_its_ends_as_from_every_offset(tokenizer):
    """The loss mask's tokens are found from each span's two ends (``char_to_token``); they must
    be exactly the tokens whose offsets overlap the span, for spans that start or end inside a
    token, inside a character several tokens share (an emoji's bytes) or on a special token."""
    import random

    from align.data.tokenize import _encode

    rng = random.Random(0)
    pieces = ["word", " ", "é", "🙂", "\n", "</s>", "<|user|>", "ab", "  ", "中文", "x"]
    checked = 0
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
        for special in (False, True):
            ids, offsets = _encode(tokenizer, text, add_special_tokens=special)
            for _ in range(5):
                a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
                spans = [(a, b)] + ([(b, len(text))] if rng.random() < 0.3 else [])
                fast = offsets.overlapping(spans)
                assert fast.tolist() == offsets.all_overlapping(spans).tolist(), (text, spans)
                assert len(fast) == len(ids)
                checked += fast.any()
    assert checked > 1000
