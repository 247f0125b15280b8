"""TRL's metrics under TRL's names and meanings (issue 28, point 6).

Each metric of SFT (``entropy``, ``mean_token_accuracy``), DPO (``logits/chosen``,
``logits/rejected``, ``entropy``, ``mean_token_accuracy``) and KTO (``logits/*``, ``entropy``)
is compared three ways on one tiny model and fixed token ids: with a computation from the
model's full logits written here, with TRL 1.16's own trainer (``compute_loss`` on the same ids,
its ``_metrics`` read back), and between align's padded and packed layouts. ``num_tokens`` is
compared with TRL's too: each sequence's real tokens in full, where the packed layout computes a
shared prompt once (``num_tokens_computed``).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import align
from align.data.batching import count_sequence_tokens, count_tokens, every_sequence_batch
from align.data.packing import pack, pack_in_order
from align.demo import build_demo_model
from align.loop.metrics import MetricSums
from align.reference.models import ModelReference

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TOLERANCE = 1e-4  # relative
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32], [41, 42, 43, 44, 45, 46]]
CHOSEN = [[50, 51, 52, 53], [60, 61], [70, 71, 72, 73, 74], [80, 81, 82]]  # see `model`
REJECTED = [[90, 91], [100, 101, 102, 103, 104], [110], [120, 121, 122, 123]]
LABELS = [True, False, True, False]  # KTO: completions CHOSEN, desirable or not


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("metrics-tiny")
    build_demo_model(path, hidden_size=64, layers=2)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(3)
    with torch.no_grad():  # logits away from the seeded start, so accuracy is not 0 or 1
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    with torch.no_grad():  # every other chosen token the model's own argmax: accuracy ~ 1/2
        for prompt, completion in zip(PROMPTS, CHOSEN, strict=True):
            for j in range(0, len(completion), 2):
                logits = model(input_ids=torch.tensor([prompt + completion[:j]])).logits
                completion[j] = int(logits[0, -1].argmax())
    return model.train()


def _scored(prompt, completion):
    return list(prompt) + list(completion), [0] * len(prompt) + [1] * len(completion)


def _sequences(completions):
    return [_scored(p, c) for p, c in zip(PROMPTS, completions, strict=True)]


def _means(output) -> dict[str, float]:
    sums = MetricSums()
    sums.add_all(output.metrics)
    return sums.reduce()


# -- the metrics from the full logits, computed here ----------------------------------------------
def _full(model, sequences):
    """Per sequence: the shifted logits of its completion tokens and their targets."""
    out = []
    with torch.no_grad():
        for ids, mask in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            trained = torch.tensor(mask[1:]).bool()
            out.append((logits[trained], torch.tensor(ids[1:])[trained]))
    return out


def _expected(model, sequences, chosen):
    """Token means over the completion tokens: entropy (all), logits/* (mean over the
    vocabulary, then over the chosen or other sequences' tokens), accuracy (chosen)."""
    rows = _full(model, sequences)
    total = {"entropy": [0.0, 0], "chosen": [0.0, 0], "rejected": [0.0, 0], "correct": [0.0, 0]}
    for (logits, targets), is_chosen in zip(rows, chosen, strict=True):
        logp = torch.log_softmax(logits, -1)
        total["entropy"][0] += float(-(logp.exp() * logp).sum())
        total["entropy"][1] += len(targets)
        side = total["chosen" if is_chosen else "rejected"]
        side[0] += float(logits.mean(-1).sum())
        side[1] += len(targets)
        if is_chosen:
            total["correct"][0] += float((logits.argmax(-1) == targets).sum())
            total["correct"][1] += len(targets)
    names = {"entropy": "entropy", "chosen": "logits/chosen", "rejected": "logits/rejected"}
    names["correct"] = "mean_token_accuracy"
    return {names[k]: s / n for k, (s, n) in total.items() if n}


def _close(got: float, want: float, what: str) -> None:
    assert got == pytest.approx(want, rel=TOLERANCE, abs=1e-6), what


# -- align's batches ------------------------------------------------------------------------------
def _sft_batch(packed: bool):
    rows = [{"input_ids": ids, "completion_mask": mask} for ids, mask in _sequences(CHOSEN)]
    return every_sequence_batch(rows, 0, packed)


def _dpo_batch(packed: bool):
    if not packed:
        rows = [*_sequences(CHOSEN), *_sequences(REJECTED)]
        examples = [{"input_ids": ids, "completion_mask": mask} for ids, mask in rows]
        return every_sequence_batch(examples, 0, False)
    groups = [list(pair) for pair in zip(_sequences(CHOSEN), _sequences(REJECTED), strict=True)]
    n = len(groups)
    return pack_in_order(groups, [[i, n + i] for i in range(n)], 0)


def _kto_batch(packed: bool):
    mismatched = _sequences(CHOSEN[1:] + CHOSEN[:1])  # as TRL's KL completions: shifted by one
    examples = [
        {"input_ids": ids, "completion_mask": mask, "mismatched_input_ids": m_ids,
         "mismatched_completion_mask": m_mask}
        for (ids, mask), (m_ids, m_mask) in zip(_sequences(CHOSEN), mismatched, strict=True)
    ]  # fmt: skip
    batch = every_sequence_batch(examples, 0, packed)
    batch["labels"] = torch.tensor(LABELS)
    return batch


def _align_metrics(objective, model, model_dir, batch):
    from types import SimpleNamespace

    import align_dpo
    import align_kto
    import align_sft
    from align.plugins.testing import _OneProcess

    module, options = {
        "sft": (align_sft, align_sft.SFTOptions()),
        "dpo": (align_dpo, align_dpo.DPOOptions()),
        "kto": (align_kto, align_kto.KTOOptions()),
    }[objective]
    arguments = {"model": model, "batch": batch, "options": options}
    if objective != "sft":
        arguments["reference"] = ModelReference(AutoModelForCausalLM.from_pretrained(model_dir))
    if objective == "kto":
        arguments["run"] = SimpleNamespace(accelerator=_OneProcess())
    return _means(module.align_compute_loss(**arguments))


# -- TRL's trainers on the same ids ---------------------------------------------------------------
def _trl_metrics(objective, model, model_dir, tmp_path):
    """TRL 1.16's trainer's metrics after one ``compute_loss`` on the same token ids."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import trl

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "bf16": False}
    common["per_device_train_batch_size"] = len(PROMPTS)
    text = {"prompt": ["a b"] * 4, "completion": ["c d"] * 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if objective == "sft":
            trainer = trl.SFTTrainer(
                model=model,
                args=trl.SFTConfig(**common),
                train_dataset=Dataset.from_dict(text),
                processing_class=tokenizer,
            )
            # labelled as TRL's dataset preparation labels a prompt-completion record
            labelled = [(ids, [-100] * len(p) + c) for ids, p, c in zip(
                [ids for ids, _ in _sequences(CHOSEN)], PROMPTS, CHOSEN, strict=True
            )]  # fmt: skip
            examples = [{"input_ids": ids, "labels": labels} for ids, labels in labelled]
        elif objective == "dpo":
            data = {"prompt": text["prompt"], "chosen": ["c"] * 4, "rejected": ["d"] * 4}
            trainer = trl.DPOTrainer(
                model=model,
                ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
                args=trl.DPOConfig(**common),
                train_dataset=Dataset.from_dict(data),
                processing_class=tokenizer,
            )
            examples = [
                {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)
            ]
        else:
            data = {**text, "label": LABELS}
            trainer = trl.KTOTrainer(
                model=model,
                ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
                args=trl.KTOConfig(**common),
                train_dataset=Dataset.from_dict(data),
                processing_class=tokenizer,
            )
            examples = [
                {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": label}
                for p, c, k, label in zip(
                    PROMPTS, CHOSEN, CHOSEN[1:] + CHOSEN[:1], LABELS, strict=True
                )
            ]
    model.train()
    inputs = trainer.data_collator(examples)
    with torch.no_grad():
        trainer.compute_loss(model, inputs)
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}


CASES = {
    # objective: (the sequences the metrics cover, which of them are chosen, TRL's names)
    "sft": ([*CHOSEN], [True] * 4, ["entropy", "mean_token_accuracy"]),
    "dpo": (
        [*CHOSEN, *REJECTED],
        [True] * 4 + [False] * 4,
        ["entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"],
    ),
    "kto": ([*CHOSEN], LABELS, ["entropy", "logits/chosen", "logits/rejected"]),
}
BATCHES = {"sft": _sft_batch, "dpo": _dpo_batch, "kto": _kto_batch}


@pytest.mark.parametrize("objective", list(CASES))
def test_token_metrics_equal_full_logits_and_trl(objective, model, model_dir, tmp_path):
    completions, chosen, names = CASES[objective]
    sequences = [_scored(PROMPTS[i % 4], c) for i, c in enumerate(completions)]
    expected = _expected(model, sequences, chosen)  # SFT: every sequence is "chosen"
    trl_metrics = _trl_metrics(objective, model, model_dir, tmp_path)
    for packed in (False, True):
        got = _align_metrics(objective, model, model_dir, BATCHES[objective](packed))
        for name in names:
            _close(got[name], expected[name], f"{objective} {name}, packed={packed}: full logits")
            _close(got[name], trl_metrics[name], f"{objective} {name}, packed={packed}: TRL")
        if "mean_token_accuracy" in names:  # some tokens right, some wrong
            assert 0 < got["mean_token_accuracy"] < 1
    if objective == "dpo":  # TRL's accuracy is the chosen side's alone
        everything = _expected(model, sequences, [True] * 8)["mean_token_accuracy"]
        assert everything != pytest.approx(expected["mean_token_accuracy"], rel=1e-3)


@pytest.mark.parametrize("objective", list(CASES))
def test_num_tokens_is_trl_s_and_the_packed_count_its_own(objective, model, model_dir, tmp_path):
    """TRL counts the attention mask of the batch it trains on (KTO: not its KL batch): every
    sequence's prompt and completion. A packed batch holds a shared prompt once: the same
    num_tokens, fewer computed."""
    trl_tokens = _trl_metrics(objective, model, model_dir, tmp_path)["num_tokens"]
    padded, packed = BATCHES[objective](False), BATCHES[objective](True)
    assert float(count_sequence_tokens(padded)) == trl_tokens
    assert float(count_sequence_tokens(packed)) == trl_tokens
    assert float(count_tokens(padded)) >= trl_tokens  # KTO: the mismatched sequences too
    if objective == "dpo":  # the shared prompts once
        shared = sum(len(p) - 1 for p in PROMPTS)
        assert float(count_tokens(packed)) == trl_tokens - shared


def test_num_tokens_of_groups_of_several_sequences():
    """Groups of three sequences (GRPO's completions of a prompt), one group whose sequences
    share nothing, single sequences, several rows: each sequence counted in full."""
    groups = [
        [_scored([1, 2, 3, 4], [5]), _scored([1, 2, 3, 4], [6, 7]), _scored([1, 2, 3, 4], [8])],
        [_scored([9], [10, 11]), _scored([12], [13])],  # nothing shared
        [_scored([14, 15], [16, 17, 18])],
        [_scored([19, 20, 21], [22]), _scored([19, 20, 21], [23, 24, 25, 26])],
    ]
    expected = sum(len(ids) for group in groups for ids, _ in group)
    for row_tokens in (0, 8, 64):
        batch = pack(groups, 0, row_tokens=row_tokens)
        assert int(count_sequence_tokens(batch)) == expected
        assert int(count_tokens(batch)) == expected - 2 * 3 - 1 * 2  # prompts of 3 and 2 shared


def test_extremes_are_per_micro_batch_then_averaged_nan_left_out():
    sums = MetricSums()
    sums.add_all({"low": align.Extreme(torch.tensor([0.5, float("nan"), 0.25]), "min")})
    sums.add_all({"low": align.Extreme(torch.tensor([float("nan")]), "min")})  # adds none
    step = MetricSums()
    step.add_all({"low": align.Extreme([0.75, 1.0], "min"), "high": align.Extreme([0, 2], "max")})
    sums.merge(step)
    assert sums.reduce() == {"low": pytest.approx((0.25 + 0.75) / 2), "high": 2.0}
    sums.clear()
    assert sums.reduce() == {}
    with pytest.raises(TypeError, match="min' or 'max"):
        align.Extreme([1.0], "mean")
    with pytest.raises(TypeError, match="sum, count"):
        sums.add_all({"bad": 1.0})


def test_a_run_logs_the_metrics_and_both_token_counts(tmp_path, model_dir, write_jsonl):
    """DPO packed and padded: the same metrics and num_tokens, fewer tokens computed packed;
    both counts are cumulative."""
    from click.testing import CliRunner

    from align.cli import cli

    rows = [
        {"prompt": "what is one plus two", "chosen": "three", "rejected": "four"},
        {"prompt": "what is two plus two", "chosen": "four", "rejected": "five"},
    ] * 4
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    logged = {}
    for layout in ("--padding-free", "--no-padding-free"):
        out = tmp_path / layout
        args = ["run", "--objective", "dpo", "--model", str(model_dir), "--data", str(data)]
        args += ["--batch-size", "4", "--max-steps", "2", "--output-dir", str(out), layout]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        text = (out / "metrics.jsonl").read_text().splitlines()
        logged[layout] = [json.loads(line) for line in text]
    packed, padded = logged["--padding-free"], logged["--no-padding-free"]
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert packed[0][name] == pytest.approx(padded[0][name], rel=1e-5), name
    assert [r["num_tokens"] for r in packed] == [r["num_tokens"] for r in padded]
    assert packed[1]["num_tokens"] > packed[0]["num_tokens"] > 0  # cumulative
    computed = [r["num_tokens_computed"] for r in packed]
    assert computed[0] < packed[0]["num_tokens"]  # each pair's prompt once
    assert [r["num_tokens_computed"] for r in padded] == [r["num_tokens"] for r in padded]


def test_head_entropy_and_mean_logits_equal_the_full_logits():
    """Several chunks of rows, each in several cache-sized blocks (a 50,000-token vocabulary:
    5 rows a block), with Gemma's softcap and a temperature: the full logits' entropy and mean."""
    from align.model.head import hidden_target_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50_000, bias=True)
    hidden = torch.randn(23, 16) * 3
    targets = torch.randint(0, 50_000, (23,))
    for softcap, temperature in ((None, 1.0), (2.0, 0.7)):
        out = hidden_target_logps(
            hidden, targets, head, softcap=softcap, temperature=temperature, entropy=True,
            mean_logits=True, chunk_rows=7,
        )  # fmt: skip
        with torch.no_grad():
            logits = head(hidden)
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            logits = logits / temperature
            logp = torch.log_softmax(logits, -1)
        torch.testing.assert_close(out.entropy, -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.mean_logits, logits.mean(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logps, logp.gather(-1, targets[:, None])[:, 0])
    empty = hidden_target_logps(hidden[:0], targets[:0], head, entropy=True, mean_logits=True)
    assert empty.entropy.shape == empty.mean_logits.shape == (0,)


def test_an_on_policy_run_counts_a_round_once(tmp_path, model_dir, write_jsonl):
    """A round trained on for two steps: num_tokens (TRL's GRPO: prompts and completions of
    each round, a prompt once per completion) grows at the round's first step only, the same
    packed and padded; num_tokens_computed grows at every step, by less when packed."""
    from click.testing import CliRunner
    from reinforce_plugin import FixedCompletions, Reinforce

    from align.cli import cli
    from align.testing import registered

    prompts = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": a + b}
        for a, b in [(1, 2), (10, 20), (3, 4), (7, 30)]
    ]
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    logged = {}
    for layout in ("--padding-free", "--no-padding-free"):
        out = tmp_path / layout
        args = ["run", "--objective", "reinforce", "--model", str(model_dir), "--data", str(data)]
        args += ["--reward", "addition", "--generator", "fixed", "--max-completion-length", "8"]
        args += ["--batch-size", "2", "--max-steps", "4", "--output-dir", str(out), layout]
        with registered(Reinforce(generations=3, reuse=2), FixedCompletions(), only=True):
            result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        text = (out / "metrics.jsonl").read_text().splitlines()
        logged[layout] = [json.loads(line) for line in text]
    packed, padded = logged["--padding-free"], logged["--no-padding-free"]
    tokens = [r["num_tokens"] for r in padded]
    assert [r["num_tokens"] for r in packed] == tokens
    assert tokens[0] == tokens[1] < tokens[2] == tokens[3]  # rounds at steps 1 and 3
    computed = [r["num_tokens_computed"] for r in padded]
    assert computed == [tokens[0], 2 * tokens[0], tokens[2] + tokens[0], 2 * tokens[2]]
    assert [r["num_tokens_computed"] for r in packed][1] < computed[1]


def test_terminated_lengths_are_0_when_no_completion_ended_in_eos():
    """As TRL: no terminated completion in the round, min and max terminated lengths 0."""
    from types import SimpleNamespace

    from align.plugins.testing import _OneProcess
    from align.rollout.engine import RolloutEngine

    engine = SimpleNamespace(rewards={"train": SimpleNamespace(names=[])})
    batch = {
        "rewards": torch.tensor([1.0, 0.0]),
        "completion_lengths": torch.tensor([8, 8]),
        "truncated": torch.tensor([True, True]),
    }
    sums = MetricSums()
    RolloutEngine._round_metrics(engine, [batch], sums, _OneProcess())
    values = sums.reduce()
    assert values["completions/min_terminated_length"] == 0
    assert values["completions/max_terminated_length"] == 0
    assert values["completions/clipped_ratio"] == 1
