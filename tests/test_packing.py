"""Padding-free batches (align.packing): every sequence's log-probs and gradients equal the
padded path's, shared prompts are computed once, and nothing attends across sequences."""

import pytest
import torch

from align import demo
from align.data.batching import count_tokens, paired_batch, sequence_batch
from align.data.formats import default_batch
from align.data.packing import pack, pack_in_order, shared_prefix
from align.model.logprobs import forward_logps


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("model")
    demo.build_demo_model(path)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def seq(prompt, completion):
    return (prompt + completion, [0] * len(prompt) + [1] * len(completion))


def tokens(n, start=5):
    return [(start + 7 * i) % 400 + 3 for i in range(n)]


def test_shared_prefix_stops_at_the_first_trained_token():
    a, b = seq(tokens(6), tokens(3, 50)), seq(tokens(6), tokens(4, 90))
    assert shared_prefix([a, b]) == 6
    early = (a[0], [0, 0, 0, 1, 1, 1, 1, 1, 1])  # trains from token 3, inside the common part
    assert shared_prefix([early, b]) == 3
    assert shared_prefix([a, seq(tokens(2, 200), tokens(2))]) == 0  # nothing in common


def test_a_pair_shares_its_prompt_and_each_branch_attends_to_it_alone():
    prompt = tokens(5)
    chosen, rejected = seq(prompt, [11, 12, 13]), seq(prompt, [21, 22])
    batch = pack([[chosen, rejected]], pad_token_id=0)
    # prompt[:-1] once, then each branch: a copy of the prompt's last token and its completion
    assert batch["input_ids"][0].tolist() == prompt[:-1] + [prompt[-1], 11, 12, 13] + [
        prompt[-1],
        21,
        22,
    ]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6]
    mask = batch["attention_mask"][0, 0]
    rejected_start = 8
    assert mask[rejected_start, :4].all()  # sees the shared prompt
    assert not mask[rejected_start, 4:8].any()  # never the chosen branch
    assert mask[rejected_start:, rejected_start:].equal(torch.ones(3, 3, dtype=bool).tril())
    assert batch["target_mask"].sum() == 5
    assert batch["sequence_digests"].shape == (2, 16)


def test_groups_pack_into_rows_no_wider_than_the_widest_group():
    groups = [[seq(tokens(8), tokens(8))], [seq(tokens(3), tokens(2))], [seq(tokens(4), tokens(3))]]
    batch = pack(groups, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 16)  # 16 | 7 + 5 (+ 4 padding)
    assert int(count_tokens(batch)) == 16 + 7 + 5
    mask = batch["attention_mask"][1, 0]
    assert mask[7:12, 7:12].equal(torch.ones(5, 5, dtype=bool).tril())
    assert not mask[7:12, :7].any()  # the second group in the row never sees the first
    assert not mask[12:, :12].any()  # nor does the padding


def _logps_both_ways(model, groups, slots):
    flat = [None] * sum(map(len, slots))
    for group, group_slots in zip(groups, slots, strict=True):
        for sequence, slot in zip(group, group_slots, strict=True):
            flat[slot] = sequence
    rows = [{"input_ids": ids, "completion_mask": mask} for ids, mask in flat]
    return (
        forward_logps(model, sequence_batch(rows, pad_token_id=0)),
        forward_logps(model, pack_in_order(groups, slots, pad_token_id=0)),
    )


GROUPS = [
    [seq(tokens(10), tokens(5, 30)), seq(tokens(10), tokens(8, 60))],  # a shared prompt
    [seq(tokens(4, 70), tokens(3)), seq(tokens(4, 70), tokens(3))],  # identical answers
    [seq(tokens(6, 90), tokens(2)), seq(tokens(3, 150), tokens(9))],  # nothing in common
    [seq(tokens(7, 11), tokens(6))],  # one sequence
    [(tokens(5), [0] * 5)],  # nothing to train
]
SLOTS = [[0, 5], [1, 6], [2, 7], [3], [4]]


def test_packed_log_probs_equal_the_padded_ones(model):
    with torch.no_grad():
        padded, packed = _logps_both_ways(model, GROUPS, SLOTS)
    assert torch.allclose(packed.sums, padded.sums, atol=1e-5, rtol=0)
    assert packed.num_tokens.tolist() == padded.num_tokens.tolist()
    assert packed.sums[4] == 0
    correct = ((packed.predicting_logits.argmax(-1) == packed.targets) * packed.mask).sum()
    want = ((padded.predicting_logits.argmax(-1) == padded.targets) * padded.mask).sum()
    assert correct == want


def test_packed_gradients_equal_the_padded_ones(model):
    weights = torch.linspace(-1, 1, 8)
    grads = []
    for index in (0, 1):
        model.zero_grad(set_to_none=True)
        out = _logps_both_ways(model, GROUPS, SLOTS)[index]
        (out.sums * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-5, rtol=1e-4), name


def test_the_packed_preference_batch_keeps_the_chosen_then_rejected_order(model):
    examples = [
        {
            "chosen_input_ids": ids,
            "chosen_completion_mask": mask,
            "rejected_input_ids": r_ids,
            "rejected_completion_mask": r_mask,
        }
        for (ids, mask), (r_ids, r_mask) in (GROUPS[0], GROUPS[1], GROUPS[2])
    ]
    with torch.no_grad():
        padded = forward_logps(model, paired_batch(examples, 0)).sums
        packed = forward_logps(model, default_batch("preference", examples, 0, packed=True)).sums
    assert torch.allclose(packed, padded, atol=1e-5, rtol=0)


def test_default_batch_batches_every_sequence_prefix():
    examples = [
        {"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1], "label": True},
        {"input_ids": [1, 4], "completion_mask": [0, 1], "label": False},
    ]
    for example, partner in zip(examples, ([1, 5, 6, 7], [1, 8]), strict=True):
        example["mismatched_input_ids"] = partner
        example["mismatched_completion_mask"] = [0] + [1] * (len(partner) - 1)
    for packed in (False, True):
        batch = default_batch("feedback", examples, 0, packed)
        assert batch["labels"].tolist() == [True, False]
        assert int(count_tokens(batch)) == 5 + 6
        key = "mismatched_sequence_digests" if packed else "mismatched_attention_mask"
        assert key in batch


def test_packing_is_refused_where_a_custom_mask_would_change_the_model(model):
    from align.model.probe import why_not_packable

    assert why_not_packable(model) is None
    config = model.config
    try:
        config.layer_types = ["full_attention", "sliding_attention"] * 2
        assert "sliding-window" in why_not_packable(model)
        config.layer_types = None
        config._attn_implementation = "flash_attention_2"
        assert "flash_attention_2" in why_not_packable(model)
    finally:
        config.layer_types = ["full_attention"] * 4
        config._attn_implementation = "sdpa"
    assert why_not_packable(model) is None


def test_the_probe_catches_a_model_that_ignores_positions(model, monkeypatch):
    from align.model.probe import why_not_packable

    forward = type(model).forward

    def without_positions(self, *args, position_ids=None, **kwargs):
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", without_positions)
    assert "differ" in why_not_packable(model)


def _loaded(path, attention, precision):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()
    return model.to(torch.bfloat16) if precision == "bf16 weights" else model


@pytest.mark.parametrize("precision", ["fp32", "bf16 weights", "bf16 autocast"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_every_admitted_attention_gives_the_padded_log_probs(model_dir, attention, precision):
    """``eager`` adds a 4-D mask to its scores: a boolean one masked nothing (0.51 off in fp32)."""
    from align.model.probe import why_not_packable

    model = _loaded(model_dir, attention, precision)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16 autocast")
    with torch.no_grad(), autocast:
        padded, packed = _logps_both_ways(model, GROUPS, SLOTS)
    tolerance = 1e-5 if precision == "fp32" else 1e-2
    assert torch.allclose(packed.sums.float(), padded.sums.float(), atol=tolerance, rtol=0)
    assert why_not_packable(model) is None


def test_weights_on_the_meta_device_are_a_reason_to_pad(model):
    """No probe can run on them (FSDP's cpu_ram_efficient_loading leaves them there on all but
    one process a machine): that pads the run, and says why, rather than pass it unprobed."""
    from align.model.probe import why_not_packable

    with torch.device("meta"):
        unloaded = type(model)(model.config)
    assert "meta device" in why_not_packable(unloaded, "reference model")
