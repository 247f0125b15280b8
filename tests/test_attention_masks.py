"""The packed layout under every attention implementation (align.model.attention): the
FlexAttention mask_mod and block mask are the dense mask, flash attention gets sequence
boundaries, rows filled to a token budget keep every log-prob. CPU only: FlexAttention runs its
forward unfused here (transformers would compile it), flash attention's kernel is a stand-in
that computes each sequence's causal attention with sdpa."""

import pytest
import torch

from align.data.batching import sequence_batch
from align.data.fields import reserved_problem
from align.data.packing import NO_PROMPT, pack
from align.errors import ConfigError
from align.model.attention import (
    attention_bias,
    batch_has_shared_prompt,
    dense_attention_mask,
    packed_attention,
    packed_block_mask,
    packed_mask_mod,
    packing_options,
    varlen_attention_kwargs,
)
from align.model.logprobs import forward_logps, target_logps

# the unfused FlexAttention forward is the point on CPU (see unfused_flex)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def seq(prompt, completion):
    return (prompt + completion, [0] * len(prompt) + [1] * len(completion))


def tokens(n, start=5):
    return [(start + 7 * i) % 400 + 3 for i in range(n)]


SINGLES = [[seq(tokens(4, s), tokens(1 + s % 7, s + 1))] for s in (10, 20, 30, 40, 50)]
SHARED = [
    [seq(tokens(9), tokens(4, 30)), seq(tokens(9), tokens(6, 60))],  # a pair sharing a prompt
    [seq(tokens(5, 80), tokens(2, 1)), seq(tokens(5, 80), tokens(5, 2)), seq(tokens(5, 80), [9])],
    [seq(tokens(6, 90), tokens(2)), seq(tokens(3, 150), tokens(7))],  # nothing in common
    [seq(tokens(3, 70), tokens(3)), seq(tokens(3, 70), tokens(3))],  # identical
    [seq(tokens(7, 11), tokens(6))],
]
LAYOUTS = {
    "single sequences": (SINGLES, {}),
    "shared prompts": (SHARED, {}),
    "shared prompts, rows to 40 tokens": (SHARED, {"row_tokens": 40}),
    "single sequences, one row": (SINGLES, {"row_tokens": 1000}),
    "prefixed": (SHARED[:2] + SINGLES[:2], {"prefix": "chosen_"}),
}


def packed(name):
    groups, options = LAYOUTS[name]
    return pack(groups, pad_token_id=0, **options), options.get("prefix", "")


def ids(batch, prefix):
    return batch[f"{prefix}attention_block"], batch[f"{prefix}attention_prompt_block"]


def mask_mod_on_grids(block, prompt_block):
    """The mask_mod evaluated at every (row, query, key) by broadcasting index grids."""
    rows, width = block.shape
    b = torch.arange(rows)[:, None, None]
    q, kv = torch.arange(width)[None, :, None], torch.arange(width)[None, None, :]
    return packed_mask_mod(block, prompt_block)(b, 0, q, kv).unsqueeze(1)


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_mask_mod_is_the_dense_mask_pack_builds(name):
    batch, prefix = packed(name)
    dense = batch[f"{prefix}attention_mask"]
    assert mask_mod_on_grids(*ids(batch, prefix)).equal(dense)
    assert dense_attention_mask(*ids(batch, prefix)).equal(dense)
    block, prompt_block = ids(batch, prefix)
    for row, prompts in zip(block, prompt_block, strict=True):  # a named prompt is in the row
        assert torch.isin(prompts[prompts != NO_PROMPT], row).all()


def test_flex_attentions_own_evaluation_of_the_mask_mod_is_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    batch, _ = packed("shared prompts")
    rows, width = batch["input_ids"].shape
    evaluated = create_mask(packed_mask_mod(*ids(batch, "")), rows, 1, width, width, device="cpu")
    assert evaluated.equal(batch["attention_mask"])


@pytest.mark.parametrize("name", ["shared prompts", "shared prompts, rows to 40 tokens"])
def test_the_block_mask_keeps_exactly_the_tiles_some_query_attends_in(name):
    batch, _ = packed(name)
    size = 4
    block_mask = packed_block_mask(*ids(batch, ""), block_size=size)
    dense = batch["attention_mask"][:, 0]
    rows, width = dense.shape[:2]
    tiles = -(-width // size)
    padded = torch.zeros(rows, tiles * size, tiles * size, dtype=torch.bool)
    padded[:, :width, :width] = dense
    any_in_tile = padded.view(rows, tiles, size, tiles, size).any(4).any(2)
    assert block_mask.shape == (rows, 1, width, width)
    assert block_mask.to_dense()[:, 0].bool().equal(any_in_tile)
    assert mask_mod_on_grids(*ids(batch, "")).equal(batch["attention_mask"])


def test_the_dense_mask_can_be_left_out_and_nothing_else_changes():
    with_mask = pack(SHARED, 0, row_tokens=40)
    without = pack(SHARED, 0, row_tokens=40, dense_mask=False)
    assert set(with_mask) - set(without) == {"attention_mask"}
    assert all(without[key].equal(value) for key, value in without.items())
    assert all(without[key].equal(with_mask[key]) for key in without)


def test_prompt_ids_name_a_shared_prompt_only_where_there_is_one():
    batch = pack(SINGLES + SHARED[2:3], 0)  # the last group's sequences share nothing
    assert (batch["attention_prompt_block"] == NO_PROMPT).all()
    assert not batch_has_shared_prompt(batch)
    assert batch_has_shared_prompt(pack(SHARED[:1], 0, prefix="chosen_"))


def test_rows_filled_to_a_token_budget_hold_more_groups_and_keep_every_log_prob(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    capped, filled = pack(SHARED, 0), pack(SHARED, 0, row_tokens=64)
    assert filled["input_ids"].shape[0] < capped["input_ids"].shape[0]
    assert filled["input_ids"].shape[1] > capped["input_ids"].shape[1]
    assert filled["input_ids"].shape[1] <= 64
    rows = [{"input_ids": i, "completion_mask": m} for group in SHARED for i, m in group]
    with torch.no_grad():
        padded = forward_logps(model, sequence_batch(rows, 0)).sums
        for batch in (capped, filled):
            assert torch.allclose(forward_logps(model, batch).sums, padded, atol=1e-5, rtol=0)


def test_only_maskless_kernels_get_filled_rows_without_a_dense_mask():
    assert packing_options("sdpa") == {"dense_mask": True, "row_tokens": None}
    assert packing_options("eager") == packing_options(None) == packing_options("sdpa")
    for maskless in ("flex_attention", "flash_attention_2", "kernels-community/flash-attn3"):
        assert packing_options(maskless)["dense_mask"] is False
        assert packing_options(maskless)["row_tokens"] > 0


def test_a_group_wider_than_the_budget_gets_a_row_of_its_own():
    batch = pack(SHARED, 0, row_tokens=8)
    widest = max(len(i) for i, _ in SHARED[0])
    assert batch["input_ids"].shape == pack(SHARED, 0)["input_ids"].shape
    assert batch["input_ids"].shape[1] >= widest


# -- the model's attention kwargs ---------------------------------------------------------------
@pytest.fixture
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()


def padded_sums(model, groups):
    rows = [{"input_ids": i, "completion_mask": m} for group in groups for i, m in group]
    with torch.no_grad():
        return forward_logps(model, sequence_batch(rows, 0)).sums


def packed_sums(model, batch, prefix=""):
    """Per-sequence log-prob sums of a packed batch run with packed_attention's kwargs."""
    with torch.no_grad():
        kwargs = packed_attention(batch, prefix, model)
        logits = model(input_ids=batch[f"{prefix}input_ids"], use_cache=False, **kwargs).logits
    logps = target_logps(logits, batch[f"{prefix}targets"], batch[f"{prefix}target_mask"])
    sums = torch.zeros(batch[f"{prefix}sequence_digests"].shape[0])
    return sums.index_add(0, batch[f"{prefix}target_sequence"].flatten(), logps.flatten())


def test_sdpa_takes_the_boolean_mask_and_builds_it_when_the_batch_has_none(model):
    batch = pack(SHARED, 0)
    kwargs = packed_attention(batch, "", model)
    assert kwargs["attention_mask"] is batch["attention_mask"]
    assert kwargs["position_ids"] is batch["position_ids"]
    built = packed_attention(pack(SHARED, 0, dense_mask=False), "", model)["attention_mask"]
    assert built.equal(batch["attention_mask"])


def test_eager_takes_an_additive_mask(model):
    model.set_attn_implementation("eager")
    batch = pack(SHARED, 0, dense_mask=False)
    bias = packed_attention(batch, "", model)["attention_mask"]
    dense = pack(SHARED, 0)["attention_mask"]
    assert bias.dtype == torch.float32
    assert (bias == 0).equal(dense)
    assert attention_bias(dense, model).equal(bias)
    assert torch.allclose(packed_sums(model, batch), padded_sums(model, SHARED), atol=1e-5)


@pytest.fixture
def unfused_flex(monkeypatch):
    """FlexAttention without torch.compile, which on the CPU is a long C++ build."""
    from align.testing import unfused_flex_attention

    unfused_flex_attention(monkeypatch)


def test_flex_attention_takes_the_block_mask_and_gives_the_sdpa_log_probs(model, unfused_flex):
    from torch.nn.attention.flex_attention import BlockMask

    model.set_attn_implementation("flex_attention")
    for name in ("shared prompts, rows to 40 tokens", "prefixed"):
        batch, prefix = packed(name)
        groups = LAYOUTS[name][0]
        assert isinstance(packed_attention(batch, prefix, model)["attention_mask"], BlockMask)
        sums = packed_sums(model, batch, prefix)
        model.set_attn_implementation("sdpa")
        want = padded_sums(model, groups)
        model.set_attn_implementation("flex_attention")
        # pack numbers sequences in group order, as padded_sums lists them
        assert torch.allclose(sums, want, atol=1e-5, rtol=0), name


@pytest.fixture
def flash_stand_in(monkeypatch):
    """transformers' real flash attention path (flash_attention_forward, _flash_attention_forward)
    over a stand-in kernel: the variable-length function runs causal sdpa on each sequence the
    boundaries delimit; the fixed-length one records that it was called, over whole rows."""
    import transformers.modeling_flash_attention_utils as flash_utils

    whole_rows = []

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None, **_):
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.equal(cu_seqlens_k)
        out = torch.empty_like(q)
        bounds = cu_seqlens_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            q_, k_, v_ = (x[start:end].transpose(0, 1) for x in (q, k, v))
            attended = torch.nn.functional.scaled_dot_product_attention(
                q_, k_, v_, is_causal=causal, scale=softmax_scale
            )
            out[start:end] = attended.transpose(0, 1)
        return out

    def fixed(q, k, v, causal=True, softmax_scale=None, **_):
        whole_rows.append(q.shape)
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
        attended = torch.nn.functional.scaled_dot_product_attention(
            q_, k_, v_, is_causal=causal, scale=softmax_scale
        )
        return attended.transpose(1, 2)

    def options(**kwargs):
        return {"causal": kwargs["is_causal"], "softmax_scale": kwargs["softmax_scale"]}

    def kernels(*args, **kwargs):
        return (fixed, varlen, None, None, None), (options, dict)

    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", kernels)
    return whole_rows


def test_flash_attention_takes_sequence_boundaries_and_no_mask(model, flash_stand_in):
    batch = pack(SINGLES, 0, row_tokens=24, dense_mask=False)
    assert batch["input_ids"].shape[0] > 1  # several rows: what position_ids alone miss
    want = padded_sums(model, SINGLES)  # under sdpa
    model.config._attn_implementation = "flash_attention_2"
    kwargs = packed_attention(batch, "", model)
    assert kwargs["attention_mask"] is None
    starts = kwargs["cu_seq_lens_q"][:-1].long()
    positions = batch["position_ids"].flatten()
    assert (positions[starts] == 0).all()  # every sequence (and padding) restarts at 0
    assert int((positions == 0).sum()) == len(starts)
    assert kwargs["max_length_q"] == int(kwargs["cu_seq_lens_q"].diff().max())
    assert torch.allclose(packed_sums(model, batch), want, atol=1e-5, rtol=0)
    assert not flash_stand_in, "the packed batch ran fixed-length flash attention over rows"


def test_position_ids_alone_would_run_flash_attention_across_a_rows_sequences(
    model, flash_stand_in
):
    """Why the boundaries are passed: transformers infers them from position_ids for a batch of
    one row only (``_is_packed_sequence``); several rows run causal attention over each row."""
    batch = pack(SINGLES, 0, row_tokens=24, dense_mask=False)
    model.config._attn_implementation = "flash_attention_2"
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    assert flash_stand_in


def test_varlen_boundaries_split_rows_even_where_ids_repeat():
    block = torch.tensor([[4, 4, 5], [5, 5, 5]])  # not pack's ids: a block continues across rows
    kwargs = varlen_attention_kwargs(block)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 2, 3, 6]
    assert kwargs["max_length_q"] == 3


def test_a_shared_prompt_under_flash_attention_is_an_error(model):
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="flex_attention .*sdpa"):
        packed_attention(pack(SHARED, 0), "", model)


def test_a_batch_without_the_ids_is_refused_where_no_dense_mask_will_do(model):
    batch = pack(SINGLES, 0)
    del batch["attention_block"]
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ConfigError, match="attention_block"):
        packed_attention(batch, "", model)


# -- choosing the attention, and the probe ------------------------------------------------------
def test_the_packed_attention_is_sdpa_off_cuda_and_a_maskless_kernel_on_it(monkeypatch):
    import transformers.utils

    from align.model.loading import PACKED_ATTENTION_ENV, packed_attention_implementation

    monkeypatch.delenv(PACKED_ATTENTION_ENV, raising=False)
    for name in ("is_flash_attn_2_available", "is_flash_attn_3_available"):
        monkeypatch.setattr(transformers.utils, name, lambda: False)
    assert packed_attention_implementation(torch.device("cpu"), shared_prompts=True) == "sdpa"
    assert packed_attention_implementation("cuda:0", shared_prompts=True) == "flex_attention"
    assert packed_attention_implementation("cuda", shared_prompts=False) == "flex_attention"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert packed_attention_implementation("cuda", shared_prompts=False) == "flash_attention_2"
    assert packed_attention_implementation("cuda", shared_prompts=True) == "flex_attention"
    monkeypatch.setenv(PACKED_ATTENTION_ENV, "sdpa")
    assert packed_attention_implementation("cuda", shared_prompts=True) == "sdpa"


def test_switching_attention_says_why_it_could_not(model):
    from align.model.loading import switch_attention

    assert switch_attention(model, "flex_attention") is None
    assert model.config._attn_implementation == "flex_attention"
    reason = switch_attention(model, "no_such_attention")
    assert "no_such_attention" in reason
    assert model.config._attn_implementation == "flex_attention"


def test_the_probe_admits_flex_attention_and_flash_attention_without_shared_prompts(
    model, unfused_flex
):
    from align.model.probe import _attention_reason, why_not_packable

    model.set_attn_implementation("flex_attention")
    assert why_not_packable(model) is None
    model.config.attention_dropout = 0.1
    assert "dropout" in why_not_packable(model)
    model.config.attention_dropout = 0.0
    model.config._attn_implementation = "flash_attention_2"
    assert "flex_attention or sdpa" in why_not_packable(model, "reference model")
    assert _attention_reason(model.config, "model", shared_prompts=False) is None


def test_the_new_batch_keys_are_reserved():
    for name in ("attention_block", "chosen_attention_prompt_block"):
        assert reserved_problem(name, []) is not None


def test_the_run_layout_follows_the_chosen_kernel():
    """``set_default_layout`` (what a run sets from its kernel) reaches every ``pack`` call
    that names no layout; 0 still caps rows where the default fills them."""
    from align.data.packing import pack, set_default_layout
    from align.model.attention import packing_options

    groups = [[([1, 2, 3, 4], [0, 0, 1, 1])], [([5, 6, 7], [0, 1, 1])], [([8, 9], [0, 1])]]
    try:
        set_default_layout(**packing_options("flex_attention"))
        filled = pack(groups, 0)
        assert "attention_mask" not in filled and filled["input_ids"].shape == (1, 9)
        assert pack(groups, 0, row_tokens=0)["input_ids"].shape == (3, 4)
    finally:
        set_default_layout()
    assert pack(groups, 0)["attention_mask"].shape == (3, 1, 4, 4)


def test_a_run_switches_its_packed_attention_when_told(tmp_path, monkeypatch):
    """``$ALIGN_PACKED_ATTENTION`` takes the CUDA path's kernel choice on any device: the
    model is switched, probed, and the run logs the kernel (eager here, which CPU runs)."""
    from click.testing import CliRunner

    from align.cli import cli

    monkeypatch.setenv("ALIGN_PACKED_ATTENTION", "eager")
    args = ["run", "--objective", "dpo", "--max-steps", "2"]  # the demo
    result = CliRunner().invoke(cli, [*args, "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "packed attention: eager" in (tmp_path / "out" / "train.log").read_text()  # a detail
    assert "padding_free: off" not in result.output
