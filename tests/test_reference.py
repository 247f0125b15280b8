"""Reference log-probs through whole runs of DPO and KTO: every ``--reference`` mode, a
different ``--ref-model``, the precomputed cache, and losses recomputed independently."""

import gc
import json
import math
import os
import shutil
import weakref

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import reset_accelerate
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import align
from align import plugins
from align.cli import cli
from align.data.examples import tokenize_records
from align.data.packing import sequence_digest
from align.data.records import read_records
from align.reference import precompute
from align.reference.precompute import PrecomputedReference

BETA = 0.1


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def _train(out, objective, model, data, flags="", *extra, expect=0):
    """``align run`` of an objective on a model and data; ``flags`` a space-separated string."""
    args = ["--objective", objective, "--model", model, "--data", data, "--output-dir", out]
    return _run(*args, *flags.split(), *extra, expect=expect)


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.fixture
def pairs(tmp_path, write_jsonl):
    rows = [
        {
            "prompt": f"What is {a} + {b}? ",
            "chosen": f"{a} + {b} = {a + b}." + " ok" * (a % 3),
            "rejected": f"It is {a + b + 1}.",
        }
        for a, b in [(1, 2), (10, 20), (3, 4), (7, 30), (12, 1), (5, 5), (40, 2), (8, 9)]
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.fixture
def feedback(tmp_path, write_jsonl):
    rows = [
        {
            "prompt": f"What is {a} + {b}? ",
            "completion": f"{a} + {b} = {a + b}." if good else f"It is {a + b + 2}.",
            "label": good,
        }
        for a, b, good in [
            (1, 2, True),
            (10, 20, False),
            (3, 4, True),
            (7, 30, False),
            (12, 1, True),
            (5, 5, False),
            (40, 2, True),
            (8, 9, False),
        ]
    ]
    return write_jsonl(tmp_path / "feedback.jsonl", rows)


@pytest.fixture(scope="session")
def other_model_dir(model_dir, tmp_path_factory):
    """A reference that differs from the starting model: its weights perturbed, same tokenizer."""
    path = tmp_path_factory.mktemp("other-model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return path


def _data(objective, pairs, feedback):
    return pairs if objective == "dpo" else feedback


# -- independent computation ----------------------------------------------------------------------
def _sequence_logp(model, ids, mask):
    """Σ log p of the completion tokens of one unpadded sequence, written out again."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    total = 0.0
    for t in range(1, len(ids)):
        if mask[t]:
            total += F.log_softmax(logits[t - 1].double(), -1)[ids[t]].item()
    return total


def _prepared(objective, data, tokenizer):
    fmt = "preference" if objective == "dpo" else "feedback"
    examples, _ = tokenize_records(read_records(data), fmt, tokenizer, 1024, "keep_start", "train")
    if objective == "kto":
        from align_kto.partners import add_mismatched_partners

        examples = add_mismatched_partners(examples, seed=42, max_length=1024, split="train")
    return examples


def _independent_loss(objective, policy, reference, examples):
    """The step's loss and reward metric over the whole data set, one sequence at a time."""

    def delta(example, prefix):
        ids, mask = example[f"{prefix}input_ids"], example[f"{prefix}completion_mask"]
        return _sequence_logp(policy, ids, mask) - _sequence_logp(reference, ids, mask)

    if objective == "dpo":
        losses, rewards = [], []
        for example in examples:
            z = delta(example, "chosen_") - delta(example, "rejected_")
            losses.append(math.log1p(math.exp(-BETA * z)))
            rewards.append(BETA * delta(example, "chosen_"))
        return sum(losses) / len(losses), {"rewards/chosen": sum(rewards) / len(rewards)}
    z0 = max(0.0, sum(delta(e, "mismatched_") for e in examples) / len(examples))
    losses, desirable_rewards = [], []
    for example in examples:
        r = delta(example, "")
        gain = BETA * (r - z0) if example["label"] else BETA * (z0 - r)
        losses.append(1 - 1 / (1 + math.exp(-gain)))
        if example["label"]:
            desirable_rewards.append(BETA * r)
    metrics = {"kl": z0, "rewards/chosen": sum(desirable_rewards) / len(desirable_rewards)}
    return sum(losses) / len(losses), metrics


# -- the tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["precomputed", "model"])
@pytest.mark.parametrize(
    ("objective", "options", "expected"),
    [
        ("dpo", [], 0.693147),
        ("kto", [], 0.5),
        ("kto", ["--set", "desirable_weight=2", "--set", "undesirable_weight=2"], 1.0),
    ],
)
def test_step_one_with_the_policy_as_reference(
    tmp_path, model_dir, pairs, feedback, mode, objective, options, expected
):
    out = tmp_path / "out"
    data = _data(objective, pairs, feedback)
    _train(
        out,
        objective,
        model_dir,
        data,
        f"--max-steps 1 --batch-size 4 --reference {mode}",
        *options,
    )
    (first,), _ = _rows(out)
    assert first["loss"] == pytest.approx(expected, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    if objective == "dpo" and mode == "model":  # the same forward for policy and reference
        assert first["rewards/accuracies"] == 0.0
    reference = json.loads((out / "run.json").read_text())["reference"]
    assert reference["mode"] == mode


@pytest.mark.parametrize("mode", ["precomputed", "model"])
def test_the_kahneman_tversky_utility_moves_the_weights_from_step_one(
    tmp_path, model_dir, feedback, mode
):
    """Policy = reference at step 1: every gain is exactly 0, and the utility's slope there
    must still train (with |g| the loss and gradient were 0 at every step in model mode)."""
    out = tmp_path / "out"
    flags = f"--max-steps 3 --batch-size 4 --lr 1e-3 --reference {mode}"
    _train(out, "kto", model_dir, feedback, flags, "--set", "utility=kahneman-tversky")
    rows, _ = _rows(out)
    assert rows[0]["loss"] == pytest.approx(0.0, abs=1e-5) and rows[0]["grad_norm"] > 1e-3
    assert rows[-1]["loss"] != 0.0
    start = load_file(str(model_dir / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    moved = max((final[name] - start[name]).abs().max().item() for name in start)
    assert moved > 1e-4


def test_the_kahneman_tversky_step_one_gradient_is_the_same_in_every_set_up(
    tmp_path, model_dir, feedback, monkeypatch
):
    """Policy = reference at step 1, so every gain is 0 up to float noise, whose sign used to
    pick each example's slope (≈2.02 or ≈4.54): grad_norm was 87.39, 73.98, 71.06 and 44.88 in
    four set-ups of one model and batch (issue 27). Within the dead band |g| ≤ ε the slope is
    the gain side's, so the step-1 gradient is the same, parameter by parameter, whatever the
    reference mode, layout and micro-batching."""
    from accelerate import Accelerator

    clip = Accelerator.clip_grad_norm_
    captured = []

    def capturing(self, parameters, *args, **kwargs):  # the step's gradient, before clipping
        parameters = list(parameters)
        captured.append([p.grad.detach().clone() for p in parameters if p.grad is not None])
        return clip(self, parameters, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", capturing)
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    layouts = {
        "batch 8": "--batch-size 8",
        "padded": "--batch-size 8 --no-padding-free",
        "4 x grad-accum 2": "--batch-size 4 --grad-accum 2",
    }
    norms, grads = {}, {}
    for mode in ("model", "precomputed"):
        for layout, flags in layouts.items():
            out, name = tmp_path / f"{mode}-{len(norms)}", f"{mode}, {layout}"
            flags += f" --reference {mode} --max-steps 1 --lr 1e-3"
            _train(out, "kto", model_dir, feedback, flags, "--set", "utility=kahneman-tversky")
            (first,), _ = _rows(out)
            assert first["loss"] == pytest.approx(0.0, abs=1e-5)
            norms[name], grads[name] = first["grad_norm"], captured.pop()
    expected, expected_grads = norms["model, batch 8"], grads["model, batch 8"]
    assert expected > 1e-3
    assert norms == {name: pytest.approx(expected, rel=1e-5) for name in norms}
    total = torch.cat([g.flatten() for g in expected_grads]).norm()
    for name, found in grads.items():
        assert len(found) == len(expected_grads), name
        difference = torch.cat(
            [(a - b).flatten() for a, b in zip(found, expected_grads, strict=True)]
        )
        assert difference.norm() <= 1e-5 * total, (name, difference.norm() / total)
        for a, b in zip(found, expected_grads, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * total), name


@pytest.mark.parametrize("mode", ["precomputed", "model"])
@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_the_reference_is_the_ref_model_after_three_updates(
    tmp_path, model_dir, other_model_dir, pairs, feedback, mode, objective
):
    """Four steps on the whole data set; the loss at step 4 (after three updates) equals a
    per-example recomputation with the step-3 policy and the other model as reference."""
    out = tmp_path / "out"
    data = _data(objective, pairs, feedback)
    flags = f"--reference {mode} --max-steps 4 --batch-size 8 --lr 1e-2 --save-every 3"
    _train(out, objective, model_dir, data, flags, "--ref-model", other_model_dir)
    train, _ = _rows(out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = _prepared(objective, data, tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-3").eval()
    reference = AutoModelForCausalLM.from_pretrained(other_model_dir).eval()
    loss, metrics = _independent_loss(objective, policy, reference, examples)
    assert train[3]["loss"] == pytest.approx(loss, abs=1e-5)
    for name, value in metrics.items():
        assert train[3][name] == pytest.approx(value, abs=1e-5), name
    # The policy as its own reference would give rewards of 0 at step 1; the other model does not.
    assert abs(train[0]["rewards/chosen"]) > 1e-2


@pytest.mark.parametrize(
    ("objective", "options"),
    [("dpo", []), ("kto", []), ("kto", ["--set", "utility=kahneman-tversky"])],
)
def test_model_and_precomputed_modes_agree(
    tmp_path, model_dir, pairs, feedback, objective, options
):
    data = _data(objective, pairs, feedback)
    logs = {}
    for mode in ("model", "precomputed"):
        out = tmp_path / mode
        flags = f"--reference {mode} --max-steps 5 --batch-size 4 --lr 1e-2 --eval-every 2"
        _train(out, objective, model_dir, data, flags, "--eval-data", data, *options)
        logs[mode] = _rows(out)
    for a, b in zip(logs["model"], logs["precomputed"], strict=True):
        assert len(a) == len(b)
        for row_a, row_b in zip(a, b, strict=True):
            assert row_a.keys() == row_b.keys()
            for key, value in row_a.items():
                if key == "rewards/accuracies" and row_a["step"] == 1:
                    continue  # a strict > of rewards that are 0 up to padding noise
                assert row_b[key] == pytest.approx(value, abs=1e-5), key


def test_the_precomputed_cache_is_reused(tmp_path, model_dir, feedback, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))

    def run(name, *extra):
        out = tmp_path / name
        flags = "--max-steps 2 --batch-size 4"
        _train(out, "kto", model_dir, feedback, flags, "--eval-data", feedback, *extra)
        info = json.loads((out / "run.json").read_text())["reference"]
        return info, _rows(out)[0]

    first, first_rows = run("first")
    assert not first["splits"]["train"]["cache_hit"]
    # eval reads the same file, so its sequences (and partners) are the train split's
    assert first["splits"]["eval"]["cache"] == first["splits"]["train"]["cache"]

    def never(*args, **kwargs):
        raise AssertionError("the reference pass ran although the cache holds its values")

    with monkeypatch.context() as patch:
        patch.setattr(precompute, "score_sequences", never)
        second, second_rows = run("second")
    assert second["splits"]["train"]["cache_hit"] and second["splits"]["eval"]["cache_hit"]
    assert [r["loss"] for r in second_rows] == [r["loss"] for r in first_rows]

    third, _ = run("third", "--seed", 7)  # other mismatched partners: other sequences to score
    assert not third["splits"]["train"]["cache_hit"]
    assert third["splits"]["train"]["cache"] != first["splits"]["train"]["cache"]


def test_the_cache_key_covers_the_reference_model(tmp_path, model_dir, other_model_dir, pairs):
    def cache_of(name, *extra):
        out = tmp_path / name
        _train(out, "dpo", model_dir, pairs, "--max-steps 1", *extra)
        return json.loads((out / "run.json").read_text())["reference"]["splits"]["train"]["cache"]

    plain = cache_of("a")
    assert cache_of("a2") == plain
    assert cache_of("b", "--ref-model", other_model_dir) != plain
    assert cache_of("c", "--max-length", 10, "--truncation", "keep_end") != plain
    reset_accelerate()  # a new precision needs a new Accelerate state, as in a new process
    assert cache_of("d", "--precision", "bf16") != plain


def test_the_model_identity_follows_the_weights_not_the_file_dates(tmp_path, model_dir):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)  # new modification times, same content
    assert precompute.model_identity(str(copy)) == precompute.model_identity(str(model_dir))
    weights = copy / "model.safetensors"
    stat = weights.stat()
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and date as before
    assert weights.stat().st_size == stat.st_size
    assert precompute.model_identity(str(copy)) != precompute.model_identity(str(model_dir))


@pytest.mark.parametrize("mode", ["precomputed", "model"])
def test_the_reference_runs_in_the_policys_mixed_precision(tmp_path, model_dir, pairs, mode):
    out = tmp_path / "out"
    _train(out, "dpo", model_dir, pairs, f"--max-steps 1 --precision bf16 --reference {mode}")
    (first,), _ = _rows(out)
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


class LoraPolicy:
    """A model-preparation plugin that wraps the policy in a PEFT LoRA adapter."""

    __name__ = "lora-under-test"

    @align.hookimpl
    def align_prepare_model(self, model):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))


def test_adapter_mode_equals_the_other_modes_for_a_lora_policy(tmp_path, model_dir, pairs):
    plugins.reset_registry(plugins.load_plugins(extra=[LoraPolicy()]))
    logs = {}
    for mode in ("adapter", "model", "precomputed"):
        out = tmp_path / mode
        flags = f"--reference {mode} --max-steps 4 --batch-size 4 --lr 5e-2"
        _train(out, "dpo", model_dir, pairs, flags)
        logs[mode] = [r["loss"] for r in _rows(out)[0]]
    assert logs["adapter"][0] == pytest.approx(0.693147, abs=1e-6)
    assert logs["adapter"][-1] < 0.69  # the adapter learns, and the reference stays put
    assert logs["adapter"] == pytest.approx(logs["model"], abs=1e-5)
    assert logs["adapter"] == pytest.approx(logs["precomputed"], abs=1e-5)


def test_adapter_mode_needs_an_adapter(tmp_path, model_dir, pairs):
    result = _train(tmp_path / "o", "dpo", model_dir, pairs, "--reference adapter", expect=1)
    assert "--reference adapter needs a policy with a PEFT (LoRA) adapter" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--objective", "sft", "--ref-model", "x"],
            "--ref-model: objective 'sft' uses no reference",
        ),
        (["--objective", "sft", "--reference", "model"], "--reference: objective 'sft' uses no"),
        (["--objective", "dpo", "--reference", "adapter", "--ref-model", "x"], "cannot be used"),
        (["--objective", "dpo", "--reference", "frozen"], "'frozen' is not one of"),
    ],
)
def test_reference_option_errors(tmp_path, args, message):
    result = _run(*args, "--output-dir", tmp_path / "o", expect=2 if "frozen" in args else 1)
    assert message in result.output


def test_a_bad_ref_model_is_named(tmp_path, model_dir, pairs):
    result = _train(tmp_path / "o", "dpo", model_dir, pairs, "--ref-model", tmp_path, expect=1)
    assert f"cannot load reference model '{tmp_path}'" in result.output


def test_a_sequence_missing_from_the_precomputed_table_is_an_error():
    reference = PrecomputedReference({sequence_digest([1, 2, 3], [0, 1, 1]): -1.5})
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 0], [1, 2, 4, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]]),
        "completion_mask": torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]]),
    }
    first = {k: v[:1] for k, v in batch.items()}
    assert reference.sequence_logps(first).tolist() == [-1.5]  # padding does not change the key
    with pytest.raises(align.PluginError, match="no value for a sequence of this batch"):
        reference.sequence_logps(batch)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_the_embedded_demo_runs(tmp_path, objective):
    out = tmp_path / "out"
    _run("--objective", objective, "--max-steps", 3, "--eval-every", 3, "--output-dir", out)
    train, evals = _rows(out)
    assert len(train) == 3 and len(evals) == 1
    assert "rewards/margins" in train[0] and "eval_rewards/margins" in evals[0]


def test_a_kto_micro_batch_of_one_class_gives_no_nan(model_dir, tokenizer, feedback):
    from align import default_batch
    from align.loop.metrics import MetricSums
    from align.reference import ModelReference
    from align_kto import KTOOptions
    from align_kto.loss import kto_loss

    examples = [e for e in _prepared("kto", feedback, tokenizer) if not e["label"]]
    batch = default_batch("feedback", examples, tokenizer.pad_token_id, packed=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    output = kto_loss(model, batch, ModelReference.frozen_copy(model), KTOOptions(), None)
    assert output.metrics["rewards/chosen"][1] == 0
    sums = MetricSums()
    sums.add_output(output, {})
    means = sums.reduce()
    assert "rewards/chosen" not in means and "rewards/rejected" in means
    assert all(math.isfinite(v) for v in means.values())


class RefModelWatch:
    """Checks, at every loss, that the --ref-model loaded for the precomputed pass is gone."""

    __name__ = "ref-model-watch"

    def __init__(self):
        self.loaded, self.alive_during_training = [], []

    @align.hookimpl
    def align_metrics(self):
        gc.collect()
        self.alive_during_training.append(any(ref() is not None for ref in self.loaded))
        return {}


def test_precomputed_loads_the_ref_model_only_on_a_miss_and_frees_it(
    tmp_path, model_dir, other_model_dir, pairs, monkeypatch
):

    from align.reference import setup as reference_setup

    watch = RefModelWatch()
    load = reference_setup.load_reference_model

    def tracked(*args, **kwargs):
        model = load(*args, **kwargs)
        watch.loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(reference_setup, "load_reference_model", tracked)
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    plugins.reset_registry(plugins.load_plugins(extra=[watch]))
    _train(tmp_path / "o", "dpo", model_dir, pairs, "--max-steps 2", "--ref-model", other_model_dir)
    assert len(watch.loaded) == 1
    assert watch.alive_during_training == [False, False]
    _train(tmp_path / "p", "dpo", model_dir, pairs, "--max-steps 1", "--ref-model", other_model_dir)
    assert len(watch.loaded) == 1  # a cache hit loads no reference model at all


def test_the_prepared_model_fingerprint_sees_changes_to_what_scores(model_dir):
    from peft import LoraConfig, get_peft_model

    from align.reference.setup import prepared_model_fingerprint

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    plain = prepared_model_fingerprint(model)
    model.get_input_embeddings().weight.requires_grad_(False)  # trains or not: scores the same
    assert prepared_model_fingerprint(model) == plain
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert prepared_model_fingerprint(wrapped) != plain
    other = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        other.lm_head.weight[-1, -1] += 1.0  # a value the samples cover
    assert prepared_model_fingerprint(other) != plain


def test_per_token_reference_log_probs_sum_to_the_sequences(model_dir, tokenizer):
    """``token_logps`` (GRPO's KL) in the batch's layout, padded or packed, sums per sequence to
    ``sequence_logps``, at temperature 1 and scaled; the adapter mode gives the same with its
    adapter off; a precomputed reference, which holds sums only, says so."""
    from peft import LoraConfig, get_peft_model

    from align.data.batching import sequence_batch
    from align.data.packing import pack
    from align.model.logprobs import forward_logps
    from align.reference.models import AdapterReference, ModelReference

    rows = []
    for prompt, answer in [("What is 1 + 2? ", "3."), ("Hi ", "Hello there."), ("2 + 2", " = 4")]:
        ids = tokenizer(prompt + answer)["input_ids"]
        cut = len(tokenizer(prompt)["input_ids"])
        rows.append({"input_ids": ids, "completion_mask": [0] * cut + [1] * (len(ids) - cut)})
    padded = sequence_batch(rows, tokenizer.pad_token_id)
    packed = pack([[(r["input_ids"], r["completion_mask"])] for r in rows], 0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = ModelReference(model)
    for batch in (padded, packed):
        out = forward_logps(model, batch)
        tokens = reference.token_logps(batch)
        assert tokens.shape == out.logps.shape
        assert torch.allclose(out.per_sequence(tokens), reference.sequence_logps(batch), atol=1e-5)
        hot = reference.token_logps(batch, temperature=0.5)
        cooled = forward_logps(model, batch, temperature=0.5).logps.detach()
        assert torch.allclose(hot, cooled, atol=1e-5) and not torch.allclose(hot, tokens)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    adapter = AdapterReference(policy)
    assert torch.allclose(adapter.token_logps(padded), reference.token_logps(padded), atol=1e-5)
    with pytest.raises(NotImplementedError, match="per-sequence sums only"):
        PrecomputedReference({}).token_logps(padded)
