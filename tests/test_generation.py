"""The first-party generation backends against plain ``model.generate``: ``transformers``
(``model.generate`` continuing from each prompt's cache, prefilled once) and ``kv-loop`` (a
lean decoding loop) sample exactly what ``model.generate`` samples on the left-padded,
repeated prompts at the same seed, greedy or sampled, with every sampling setting, on a Llama,
a Qwen2 and a LoRA-wrapped model; completions end at their first EOS or run to the limit."""

import dataclasses

import pytest
import torch

import align
from align.plugins import get_registry
from align.rollout import sampler
from align.rollout.generate import (
    cut_at_eos,
    kv_loop_generate,
    sampling_context,
    transformers_generate,
)
from align.rollout.sampler import left_padded, prefill, prompt_cache

BACKENDS = {"transformers": transformers_generate, "kv-loop": kv_loop_generate}
SETTINGS = {
    "greedy": {"temperature": 0.0},
    "sampled": {},
    "temperature and top-p": {"temperature": 0.7, "top_p": 0.8},
    "top-k and min-p": {"top_k": 20, "min_p": 0.05},
    "repetition penalty": {"repetition_penalty": 3.0},
    "greedy, repetition penalty": {"temperature": 0.0, "repetition_penalty": 3.0},
}


@pytest.fixture
def accelerator():  # per test: the suite resets accelerate's state after each
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def prompts(model_dir):
    """Chat prompts of different lengths, a two-token one and a one-token one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chats = [
        [{"role": "user", "content": text}]
        for text in ("What is 38 + 4?", "Add 15 and 16, then tell me the sum please.")
    ]
    ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True)["input_ids"] for c in chats]
    return [*ids, ids[0][-2:], ids[1][-1:]]


def _llama(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def _qwen2(model_dir):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def _lora(model_dir):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )  # as align's LoRA plugin makes it
    torch.manual_seed(0)  # random B matrices: the adapter changes what is sampled
    return get_peft_model(_llama(model_dir), config)


@pytest.fixture(scope="module", params=[_llama, _qwen2, _lora], ids=["llama", "qwen2", "lora"])
def model(request, model_dir):
    return request.param(model_dir)


def _request(model, tokenizer, prompts, **settings) -> align.GenerationRequest:
    return align.GenerationRequest(**{
        "model": model, "tokenizer": tokenizer, "prompts": prompts, "num_generations": 4,
        "max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None,
        "repetition_penalty": 1.0, "eos_token_ids": [tokenizer.eos_token_id],
        "pad_token_id": tokenizer.pad_token_id, "seed": 3, **settings,
    })  # fmt: skip


def _model_generate(request: align.GenerationRequest) -> list[list[int]]:
    """Plain ``model.generate``: every prompt repeated ``num_generations`` times, left-padded,
    sampled in one call, each row cut at its first EOS."""
    from transformers import GenerationConfig

    rows = [ids for ids in request.prompts for _ in range(request.num_generations)]
    width = max(map(len, rows))
    input_ids = torch.tensor([[request.pad_token_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    settings = {"temperature": None, "top_p": None, "top_k": None}
    if request.temperature > 0:
        settings = {"temperature": request.temperature, "top_p": request.top_p}
        settings.update(top_k=request.top_k, min_p=request.min_p)
    config = GenerationConfig(
        max_new_tokens=request.max_new_tokens, do_sample=request.temperature > 0,
        pad_token_id=request.pad_token_id, eos_token_id=request.eos_token_ids,
        repetition_penalty=request.repetition_penalty, **settings,
    )  # fmt: skip
    output = request.model.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=config
    )
    eos = set(request.eos_token_ids)
    return [cut_at_eos(row, eos) for row in output[:, width:].tolist()]


def _sample(generate, request, accelerator) -> list[list[int]]:
    """One backend call as the rollout engine makes it: eval mode, no gradients, seeded."""
    with sampling_context(request.model, accelerator, request.seed) as policy:
        return generate(dataclasses.replace(request, model=policy))


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_backends_sample_what_model_generate_samples(
    model, tokenizer, prompts, accelerator, settings
):
    request = _request(model, tokenizer, prompts, **settings)
    expected = _sample(_model_generate, request, accelerator)
    assert len(expected) == len(prompts) * 4
    for name, generate in BACKENDS.items():
        assert _sample(generate, request, accelerator) == expected, name
    plain = {"temperature": 1.0 if request.temperature > 0 else 0.0}
    if set(settings) - set(plain):  # the setting changes what is sampled
        plain_request = _request(model, tokenizer, prompts, **plain)
        assert expected != _sample(_model_generate, plain_request, accelerator)
    if request.temperature > 0:  # another seed, other samples
        other = _sample(kv_loop_generate, dataclasses.replace(request, seed=4), accelerator)
        assert other != expected


def test_top_k_1_is_greedy(model, tokenizer, prompts, accelerator):
    greedy = _request(model, tokenizer, prompts, temperature=0.0)
    top_1 = _request(model, tokenizer, prompts, top_k=1, seed=5)
    expected = _sample(_model_generate, greedy, accelerator)
    for name, generate in BACKENDS.items():
        assert _sample(generate, top_1, accelerator) == expected, name
        assert _sample(generate, greedy, accelerator) == expected, name


def test_completions_end_at_their_first_eos_or_run_to_the_limit(
    tokenizer, prompts, accelerator, model_dir
):
    model = _llama(model_dir)
    request = _request(model, tokenizer, prompts, max_new_tokens=16)
    # Two tokens the model samples often stand in for EOS ids, so that many rows stop early.
    counts = torch.bincount(torch.tensor(sum(_sample(_model_generate, request, accelerator), [])))
    stops = counts.argsort(descending=True)[:2].tolist()
    request = dataclasses.replace(request, eos_token_ids=stops)
    expected = _sample(_model_generate, request, accelerator)
    ended = [ids for ids in expected if ids[-1] in stops]
    assert ended and len(ended) < len(expected)
    assert {ids[-1] for ids in ended} == set(stops)  # either EOS ends a completion
    for name, generate in BACKENDS.items():
        completions = _sample(generate, request, accelerator)
        assert completions == expected, name
        for ids in completions:
            assert not set(ids[:-1]) & set(stops)  # nothing after the first EOS
            assert ids[-1] in stops or len(ids) == request.max_new_tokens


def test_one_token_prompts_and_one_generation(model, tokenizer, prompts, accelerator):
    for shape in (
        {"prompts": [[p[-1]] for p in prompts]},  # nothing to prefill before the last token
        {"num_generations": 1},  # nothing to share
    ):
        request = dataclasses.replace(_request(model, tokenizer, prompts), **shape)
        expected = _sample(_model_generate, request, accelerator)
        for name, generate in BACKENDS.items():
            assert _sample(generate, request, accelerator) == expected, name


def test_a_cache_that_cannot_be_repeated_is_filled_for_every_row(
    model_dir, tokenizer, prompts, accelerator, monkeypatch
):
    empty_cache = sampler.empty_cache  # as for a model with linear-attention layers
    monkeypatch.setattr(sampler, "empty_cache", lambda m, repeatable=False: (
        None if repeatable else empty_cache(m)
    ))  # fmt: skip
    request = _request(_llama(model_dir), tokenizer, prompts)
    expected = _sample(_model_generate, request, accelerator)
    for name, generate in BACKENDS.items():
        assert _sample(generate, request, accelerator) == expected, name


def test_a_model_that_picks_its_own_cache_keeps_it(model_dir, tokenizer, prompts, accelerator):
    model = _llama(model_dir)
    model.generation_config.cache_implementation = "static"
    request = _request(model, tokenizer, prompts, max_new_tokens=4)
    expected = _sample(_model_generate, request, accelerator)
    assert _sample(transformers_generate, request, accelerator) == expected


def test_each_prompt_is_prefilled_once(model, tokenizer, prompts, accelerator, monkeypatch):
    prefilled = []  # the shape of each prefill's tokens

    def spy(model, input_ids, attention_mask, cache):
        prefilled.append(tuple(input_ids.shape))
        return prefill(model, input_ids, attention_mask, cache)

    monkeypatch.setattr(sampler, "prefill", spy)
    request = _request(model, tokenizer, prompts)
    width = max(map(len, prompts))
    _sample(transformers_generate, request, accelerator)  # all but the last token, then generate
    _sample(kv_loop_generate, request, accelerator)  # the whole prompt
    assert prefilled == [(len(prompts), width - 1), (len(prompts), width)]

    input_ids, attention_mask = left_padded(prompts, tokenizer.pad_token_id)
    with torch.no_grad(), sampling_context(model, accelerator, 0):
        cache = prompt_cache(model, input_ids, attention_mask, 4)
        assert cache.get_seq_length() == width - 1
        keys = cache.layers[0].keys  # each prompt's, repeated for its copies
        assert keys.shape[0] == 4 * len(prompts)
        assert torch.equal(keys[0], keys[3]) and not torch.equal(keys[3], keys[4])
        assert prompt_cache(model, input_ids, attention_mask, 1) is None  # one copy each
        assert prompt_cache(model, input_ids[:, -1:], attention_mask[:, -1:], 4) is None


def test_kv_loop_is_a_registered_generator():
    generators = get_registry().generators
    assert generators["kv-loop"].item.generate is kv_loop_generate
    assert generators["transformers"].item.generate is transformers_generate
