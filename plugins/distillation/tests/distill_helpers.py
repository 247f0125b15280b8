"""TRL's generalised JSD on full logits, the reference every ``distill`` loss is checked
against.

Until ``align_distillation.divergence`` (the chunked kernel) is installed, a full-logits
version of it built from TRL's ``GKDTrainer.generalized_jsd_loss`` stands in for it, so the
plumbing is tested either way; once it is there, the tests run the real kernel."""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import torch


def trl_jsd(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
    """TRL 1.16's generalised JSD per position (summed over the vocabulary), full logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns that it is experimental
        from trl.experimental.gkd import GKDTrainer
    per_element = GKDTrainer.generalized_jsd_loss(
        student_logits, teacher_logits, beta=beta, temperature=temperature, reduction="none"
    )
    return per_element.sum(-1)


def full_logits_jsd(
    student_hidden, student_head, teacher_hidden, teacher_head, beta, temperature=1.0, chunk=None
):
    """``generalized_jsd``'s contract on full logits: per-position divergence (differentiable)
    and the student's entropy (no gradient), float32."""
    s = student_head.logits(student_hidden)
    t = teacher_head.logits(teacher_hidden).to(s.device)
    divergence = trl_jsd(s, t, beta, temperature)
    with torch.no_grad():
        logp = torch.log_softmax(s / temperature, -1)
        entropy = -(logp.exp() * logp).sum(-1)
    return divergence.float(), entropy.float()


def _install_stand_in() -> None:
    try:
        importlib.import_module("align_distillation.divergence")
    except ModuleNotFoundError:
        module = types.ModuleType("align_distillation.divergence")
        module.generalized_jsd = full_logits_jsd
        sys.modules["align_distillation.divergence"] = module


_install_stand_in()
