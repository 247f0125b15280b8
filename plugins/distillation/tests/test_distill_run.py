"""``distill`` runs: what a step trains on (samples at lmbda 1, the data's completions at
lmbda 0, the seeded draw between them), the teacher's checks, the errors that name a flag, and a
short run on the demo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

import align
from align.config import resolve
from align.plugins import get_registry
from align.rollout.mixed import round_on_policy, sampling_prompt
from align.testing import reset_accelerate

SUMS = [(a, b) for a, b in [(2, 3), (17, 25), (8, 1), (30, 12), (5, 5), (9, 14)]]
PAIRS = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}."} for a, b in SUMS]
RUN = {"batch_size": 2, "max_completion_length": 4, "data_workers": 1, "report_to": "none"}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    yield
    reset_accelerate()


@pytest.fixture
def seen(monkeypatch):
    """Every batch the distill loss gets: (on_policy, its sequences' token ids)."""
    import align_distillation.loss as loss

    batches: list[tuple[bool, list[list[int]]]] = []
    original = loss.distill_loss

    def spy(model, batch, *args, **kwargs):
        rows = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        batches.append((bool(batch["on_policy"]), rows))
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(loss, "distill_loss", spy)
    return batches


def _train(student_dir, teacher_dir, data, **extra):
    return align.train(
        "distill",
        model=str(student_dir),
        data=data,
        teacher=str(teacher_dir),
        output_dir="run",
        padding_free=False,  # the spy reads padded rows
        **{**RUN, **extra},
    )


def test_lmbda_0_trains_on_the_datas_completions(student_dir, teacher_dir, seen):
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    result = _train(student_dir, teacher_dir, PAIRS, lmbda=0.0, max_steps=3)
    data = [
        tokenizer(p["prompt"])["input_ids"]
        + tokenizer(p["completion"], add_special_tokens=False)["input_ids"]
        for p in PAIRS
    ]
    assert len(seen) == 3 and not any(on for on, _ in seen)
    rows = [json.loads(r) for r in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    read = sum(len(row) for _, rows_ in seen for row in rows_)
    assert rows[-1]["num_tokens"] == read  # TRL's num_tokens: every sequence's tokens
    assert [r["on_policy"] for r in rows] == [0.0, 0.0, 0.0]
    for _, rows in seen:
        for row in rows:  # the record's own sequence (its EOS, if the template adds one, after)
            assert any(row[: len(d)] == d for d in data), row


def test_lmbda_1_trains_on_the_students_samples_after_each_prompt(student_dir, teacher_dir, seen):
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    result = _train(student_dir, teacher_dir, PAIRS, lmbda=1.0, max_steps=3)
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in PAIRS]
    completions = [tokenizer(p["completion"], add_special_tokens=False)["input_ids"] for p in PAIRS]
    assert len(seen) == 3 and all(on for on, _ in seen)
    for _, rows in seen:
        for row in rows:
            prompt = next(p for p in prompts if row[: len(p)] == p)
            sampled = row[len(prompt) :]
            assert 1 <= len(sampled) <= RUN["max_completion_length"]
            assert sampled not in completions  # four sampled tokens are not the data's answer
    rows = [json.loads(r) for r in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "reward" not in rows[0]  # no --reward: none scored
    for row, (_, step_rows) in zip(rows, seen, strict=True):  # a round without rewards too
        sampled = [len(r) - len(next(p for p in prompts if r[: len(p)] == p)) for r in step_rows]
        assert row["completions/mean_length"] == pytest.approx(sum(sampled) / len(sampled))
        assert row["completions/max_length"] == max(sampled)


def test_lmbda_between_draws_each_step_from_the_seed(student_dir, teacher_dir, seen):
    steps = 8
    result = _train(student_dir, teacher_dir, PAIRS, lmbda=0.5, max_steps=steps, seed=3)
    expected = [round_on_policy(3, step, 0.5) for step in range(steps)]
    assert set(expected) == {True, False}  # the seed gives both kinds of step
    assert [on for on, _ in seen] == expected
    rows = [json.loads(r) for r in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows if "loss" in r] == [float(e) for e in expected]


def test_eval_scores_the_eval_datas_completions_below_lmbda_1_and_samples_at_1(
    student_dir, teacher_dir, monkeypatch
):
    import align_distillation.loss as loss

    evals: list[tuple[bool, list[list[int]]]] = []  # eval batches: (on_policy, rows)
    original = loss.distill_loss

    def spy(model, batch, *args, **kwargs):
        if not model.training:
            rows = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"],
                                                                batch["attention_mask"],
                                                                strict=True)]  # fmt: skip
            evals.append((bool(batch["on_policy"]), rows))
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(loss, "distill_loss", spy)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    held_out = PAIRS[:2]
    data = [
        tokenizer(p["prompt"])["input_ids"]
        + tokenizer(p["completion"], add_special_tokens=False)["input_ids"]
        for p in held_out
    ]
    extra = {"eval_data": held_out, "eval_every": 1, "max_steps": 2}
    _train(student_dir, teacher_dir, PAIRS, lmbda=0.5, seed=3, **extra)
    assert len(evals) == 2 and not any(on for on, _ in evals)
    assert evals[0][1] == evals[1][1]  # fixed, comparable from one evaluation to the next
    for row in evals[0][1]:  # the eval records' own sequences
        assert any(row[: len(d)] == d for d in data), row
    evals.clear()
    _train(student_dir, teacher_dir, PAIRS, lmbda=1.0, overwrite=True, **extra)
    assert len(evals) == 2 and all(on for on, _ in evals)  # sampled after the eval prompts


def test_seq_kd_trains_the_other_steps_on_the_teachers_samples(
    student_dir, teacher_dir, seen, monkeypatch
):
    import align.rollout.engine as engine

    sampled_by = []
    original = engine.sampling_context

    def spy(model, *args):
        sampled_by.append(model.config.hidden_size)
        return original(model, *args)

    monkeypatch.setattr(engine, "sampling_context", spy)
    prompts = [{"prompt": p["prompt"]} for p in PAIRS]  # no completions: seq_kd needs none
    _train(student_dir, teacher_dir, prompts, lmbda=0.0, seq_kd=True, max_steps=2)
    assert sampled_by == [64, 64]  # the teacher (hidden size 64), not the student (128)
    assert [on for on, _ in seen] == [False, False]


def test_the_draw_depends_on_the_seed_and_round_only():
    draws = [round_on_policy(42, r, 0.3) for r in range(400)]
    assert draws == [round_on_policy(42, r, 0.3) for r in range(400)]  # a resumed run: the same
    assert 0.2 < sum(draws) / len(draws) < 0.4
    assert draws != [round_on_policy(43, r, 0.3) for r in range(400)]
    assert all(round_on_policy(1, r, 1.0) for r in range(50))
    assert not any(round_on_policy(1, r, 0.0) for r in range(50))


def test_the_sampling_prompt_is_everything_before_the_last_trained_span():
    conversation = {
        "input_ids": [1, 10, 11, 20, 21, 2, 12, 13, 22, 23, 2],
        "completion_mask": [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1],
    }
    assert sampling_prompt(conversation) == [1, 10, 11, 20, 21, 2, 12, 13]
    assert sampling_prompt({"prompt_input_ids": [1, 5, 6]}) == [1, 5, 6]


def test_lmbda_below_1_with_prompts_only_is_refused_naming_lmbda(student_dir, teacher_dir):
    prompts = [{"prompt": p["prompt"], "answer": 1} for p in PAIRS]
    with pytest.raises(align.ConfigError, match=r"lmbda 0\.5 .*prompts only"):
        _train(student_dir, teacher_dir, prompts, lmbda=0.5, max_steps=1)


def test_lmbda_below_1_with_a_prompt_only_source_in_a_mixture_is_refused_naming_it(
    student_dir, teacher_dir, tmp_path
):
    pairs, prompts = tmp_path / "pairs.jsonl", tmp_path / "prompts.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in PAIRS))
    with pytest.raises(align.ConfigError, match=r"prompts\.jsonl is prompts only"):
        _train(student_dir, teacher_dir, [str(pairs), str(prompts)], lmbda=0.5, max_steps=2)
    _train(student_dir, teacher_dir, [str(pairs), str(prompts)], lmbda=1.0, max_steps=1)
    # the eval split: its completions scored, or prompt-only eval data sampled; not both (the
    # second batch of 4 of these 6 + 6 eval records would hold both kinds)
    with pytest.raises(align.ConfigError, match="--eval-data mixes prompt-only sources"):
        _train(student_dir, teacher_dir, str(pairs), lmbda=0.5, max_steps=2, batch_size=4,
               eval_data=[str(pairs), str(prompts)], eval_every=1, overwrite=True)  # fmt: skip


def test_prompt_only_data_trains_fully_on_policy_without_rewards(student_dir, teacher_dir, seen):
    prompts = [{"prompt": p["prompt"]} for p in PAIRS]
    _train(student_dir, teacher_dir, prompts, max_steps=2)  # no --reward: none needed
    assert [on for on, _ in seen] == [True, True]


# -- --teacher -----------------------------------------------------------------------------------
def test_distill_without_a_teacher_names_the_flag():
    with pytest.raises(align.ConfigError, match="give --teacher PATH"):
        resolve(get_registry(), None, {"objective": "distill"})


def test_a_teacher_for_an_objective_without_one_is_refused(teacher_dir):
    with pytest.raises(align.ConfigError, match="--teacher: objective 'sft' uses no teacher"):
        resolve(get_registry(), None, {"objective": "sft", "teacher": str(teacher_dir)})
    with pytest.raises(align.ConfigError, match="--teacher-precision: set for a teacher"):
        resolve(get_registry(), None, {"objective": "sft", "teacher_precision": "bf16"})


def _copy_model(source: Path, target: Path, tokenizer=None) -> Path:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(source).save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(
    student_dir, teacher_dir, tmp_path
):
    other = AutoTokenizer.from_pretrained(teacher_dir)
    other.add_tokens(["<tool>"])
    teacher = _copy_model(teacher_dir, tmp_path / "other-tokenizer", other)
    with pytest.raises(align.ConfigError) as error:
        _train(student_dir, teacher, PAIRS, max_steps=1)
    message = str(error.value)
    assert str(teacher) in message and "is not the policy's" in message
    assert "'<tool>'" in message and str(student_dir) in message


def test_a_reward_model_as_teacher_is_refused(student_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(student_dir, num_labels=1)
    reward_model = tmp_path / "rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(reward_model)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(reward_model)
    with pytest.raises(align.ConfigError, match="is a reward model .*ForSequenceClassification"):
        _train(student_dir, reward_model, PAIRS, max_steps=1)


def test_a_teacher_without_a_tokenizer_is_checked_by_its_vocab_size(
    student_dir, teacher_dir, tmp_path
):
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(teacher_dir)
    config.vocab_size = 40
    small = tmp_path / "small-vocab"
    LlamaForCausalLM(config).save_pretrained(small)  # weights and config, no tokenizer
    with pytest.raises(align.ConfigError, match="no tokenizer and its config's vocab_size is 40"):
        _train(student_dir, small, PAIRS, max_steps=1)


def test_a_teacher_with_another_output_head_size_is_refused(student_dir, teacher_dir, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(teacher_dir)
    config.vocab_size += 8  # padded embeddings, the same tokenizer
    padded = tmp_path / "padded-vocab"
    LlamaForCausalLM(config).save_pretrained(padded)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(padded)
    with pytest.raises(align.ConfigError, match=rf"head has {config.vocab_size} tokens"):
        _train(student_dir, padded, PAIRS, max_steps=1)


def test_an_unknown_teacher_device_is_refused_naming_the_flag(student_dir, teacher_dir):
    with pytest.raises(align.ConfigError, match="--teacher-device nowhere"):
        _train(student_dir, teacher_dir, PAIRS, max_steps=1, teacher_device="nowhere")


def test_a_teacher_whose_head_is_not_understood_is_refused(student_dir, teacher_dir, monkeypatch):
    import align.reference.teacher as teacher_module

    monkeypatch.setattr(
        teacher_module, "why_not_from_hidden", lambda model, role: f"the {role}'s head is odd"
    )
    with pytest.raises(align.ConfigError, match="the teacher's head is odd; distillation"):
        _train(student_dir, teacher_dir, PAIRS, max_steps=1)


def test_teacher_precision_bf16_loads_its_weights_in_bf16(student_dir, teacher_dir, monkeypatch):
    import torch

    import align.reference.teacher as teacher_module

    loaded = []
    original = teacher_module.load_teacher

    def spy(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr("align.loop.train.load_teacher", spy)
    _train(student_dir, teacher_dir, PAIRS, max_steps=1, teacher_precision="bf16")
    assert {p.dtype for p in loaded[0].model.parameters()} == {torch.bfloat16}


def test_resume_takes_the_teacher_directory_under_another_name(teacher_dir):
    from align.loop.resume import check_same_run

    relative = os.path.relpath(teacher_dir)  # the same directory, named from the run's cwd
    before = {"config": {"teacher": relative}, "num_processes": 1, "data": {}}
    assert check_same_run(before, {"teacher": str(teacher_dir)}, None, 1) == {}
    with pytest.raises(align.ConfigError, match="teacher: was"):  # another teacher is refused
        check_same_run(before, {"teacher": str(teacher_dir.parent)}, None, 1)


# -- the demo ------------------------------------------------------------------------------------
def test_align_run_distill_on_the_demo_completes(teacher_dir, tmp_path):
    from align.cli import cli

    args = ["run", "--objective", "distill", "--teacher", str(teacher_dir), "--max-steps", "2"]
    args += ["--batch-size", "8", "--max-completion-length", "8", "--output-dir", "demo"]
    args += ["--report-to", "none"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [json.loads(r) for r in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["loss"] > 0 and r["entropy"] > 0 for r in train)
    assert "eval_rewards/addition/mean" in rows[-1]  # the demo's sums, scored and logged
