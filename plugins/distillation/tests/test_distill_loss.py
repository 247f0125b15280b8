"""The ``distill`` loss on a real forward of two tiny models (the student at hidden size 128,
the teacher at 64, one tokenizer), padded and packed: equal to TRL 1.16's generalised JSD on
the full logits (``GKDTrainer.generalized_jsd_loss``) at every completion position, gradients
included, and to TRL's ``DistillationTrainer`` chunked loss (``_chunked_divergence_loss``)
given the same hidden states."""

from __future__ import annotations

import warnings

import pytest
import torch
from align_distillation import DistillOptions
from align_distillation.loss import distill_loss, trained_positions
from transformers import AutoModelForCausalLM, AutoTokenizer

import align
from align.reference.teacher import Teacher
from align.rollout.batch import rollout_batch


def trl_jsd(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
    """TRL 1.16's generalised JSD per position (summed over the vocabulary), full logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns that it is experimental
        from trl.experimental.gkd import GKDTrainer
    per_element = GKDTrainer.generalized_jsd_loss(
        student_logits, teacher_logits, beta=beta, temperature=temperature, reduction="none"
    )
    return per_element.sum(-1)


PROMPTS = ["What is 2 + 3?", "What is 17 + 25?"]
COMPLETIONS = ["2 + 3 = 5.", "5.", "17 + 25 = 42.", "It is 41"]  # two per prompt


def _setup(student_dir, teacher_dir, packed: bool):
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():  # a teacher unlike the seeded initialisation: divergences of size
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    examples = [{"prompt_input_ids": tokenizer(p)["input_ids"]} for p in PROMPTS]
    completions = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    completions = [c + [tokenizer.eos_token_id] for c in completions[:3]] + completions[3:]
    truncated = [False, False, False, True]
    pad = tokenizer.pad_token_id
    batch = rollout_batch(examples, completions, 2, pad, packed, truncated)
    padded = rollout_batch(examples, completions, 2, pad, False, truncated)
    return student, Teacher(teacher, str(teacher_dir), torch.device("cpu")), batch, padded


def _full_logits_loss(student, teacher, padded, beta, temperature):
    """TRL's generalised JSD on both models' full logits, at the completion positions."""
    inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    student_logits = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher.model(**inputs).logits[:, :-1]
    mask = padded["completion_mask"][:, 1:].bool()
    return trl_jsd(student_logits[mask], teacher_logits[mask], beta, temperature), mask


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_and_gradients_equal_trl_generalized_jsd_on_full_logits(
    student_dir, teacher_dir, packed, beta
):
    student, teacher, batch, padded = _setup(student_dir, teacher_dir, packed)
    temperature = 0.7
    output = distill_loss(student, batch, DistillOptions(beta=beta), teacher, temperature)
    output.loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    per_token, mask = _full_logits_loss(student, teacher, padded, beta, temperature)
    per_token.sum().backward()
    assert int(output.count) == int(mask.sum()) == int(trained_positions(batch))
    assert output.loss.item() == pytest.approx(per_token.sum().item(), rel=1e-5, abs=1e-6)
    assert output.loss.item() > 1e-3  # the two models differ: a divergence to compare
    for name, param in student.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_entropy_is_the_students_mean_token_entropy(student_dir, teacher_dir):
    student, teacher, batch, padded = _setup(student_dir, teacher_dir, False)
    with torch.no_grad():
        output = distill_loss(student, batch, DistillOptions(), teacher, 1.0)
        logits = student(padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    mask = padded["completion_mask"][:, 1:].bool()
    logp = torch.log_softmax(logits[:, :-1][mask], -1)
    entropy = -(logp.exp() * logp).sum(-1)
    total, count = output.metrics["entropy"]
    assert total.item() == pytest.approx(entropy.sum().item(), rel=1e-5)
    assert int(count) == int(mask.sum())


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (0.5, 0.8), (1.0, 1.3)])
def test_loss_equals_trl_distillation_trainers_chunked_divergence(
    student_dir, teacher_dir, beta, temperature
):
    """TRL's ``DistillationTrainer`` computes its loss with ``_chunked_divergence_loss`` from
    the two models' hidden states and head weights: the same hidden states give align's loss
    (a token mean here, as TRL's over a batch) and its entropy sum."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

    student, teacher, batch, _ = _setup(student_dir, teacher_dir, False)
    with torch.no_grad():
        output = distill_loss(student, batch, DistillOptions(beta=beta), teacher, temperature)
        student_rows = align.forward_hidden(student, batch)
        teacher_rows = teacher.hidden(batch)
    mask = torch.ones(1, student_rows.shape[0])
    loss, entropy_sum, valid = _chunked_divergence_loss(
        student_rows[None],
        teacher_rows[None],
        student.get_output_embeddings().weight,
        teacher.model.get_output_embeddings().weight,
        mask,
        beta,
        temperature=temperature,
    )
    assert int(valid) == int(output.count)
    mean = output.loss.item() / int(output.count)
    assert mean == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    assert output.metrics["entropy"][0].item() == pytest.approx(entropy_sum.item(), rel=1e-5)


def test_forward_hidden_rows_are_the_same_padded_and_packed(student_dir, teacher_dir):
    student, _, packed, padded = _setup(student_dir, teacher_dir, True)
    with torch.no_grad():
        a = align.forward_hidden(student, padded)
        b = align.forward_hidden(student, packed)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_divergences_own_errors_are_not_called_a_head_the_core_does_not_understand(
    student_dir, teacher_dir, monkeypatch
):
    import align_distillation.divergence as divergence

    def refused(*args, **kwargs):
        raise ValueError("generalized_jsd: the student's and teacher's vocabularies differ")

    monkeypatch.setattr(divergence, "generalized_jsd", refused)
    student, teacher, batch, _ = _setup(student_dir, teacher_dir, False)
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill_loss(student, batch, DistillOptions(), teacher, 1.0)
