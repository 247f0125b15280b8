"""On-policy distillation: the ``distill`` objective (TRL 1.16 ``DistillationTrainer``; GKD,
Agarwal et al. 2024).

Registered through the ``align`` entry-point group. The student (the policy) is trained to
match a frozen teacher (``--teacher PATH``) with the generalised Jensen–Shannon divergence at
every completion position, over the whole vocabulary, computed from the two models' hidden
states a block of the vocabulary at a time (``align_distillation.divergence``). A share
``lmbda`` of the rounds samples the completions from the student (on-policy), the rest trains
on the data's own completions (GKD's λ); the default, 1, is DistillationTrainer's fully
on-policy training. torch is imported only when a run needs it.
"""

from __future__ import annotations

from pydantic import Field

import align


class DistillOptions(align.Options):
    beta: float = Field(
        1.0,
        ge=0,
        le=1,
        description="β of the generalised JSD: 0 forward KL(teacher‖student), 0.5 the "
        "symmetric JSD, 1 reverse KL(student‖teacher) (TRL's DistillationTrainer default).",
    )
    lmbda: float = Field(
        1.0,
        ge=0,
        le=1,
        description="λ: the share of optimizer steps trained on the student's own samples; the "
        "rest train on the data's completions (GKD uses 0.5; 1, the default, is "
        "DistillationTrainer's fully on-policy training, which also takes prompt-only data).",
    )
    seq_kd: bool = Field(
        False,
        description="GKD's sequence-level KD: the steps not trained on the student's samples "
        "train on the teacher's samples (after the same prompts) instead of the data's "
        "completions; prompt-only data then works at any lmbda.",
    )


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="distill",
            description="On-policy distillation from a teacher model (--teacher): the "
            "generalised JSD to the teacher at every completion token, on the student's own "
            "samples, the data's completions, or a mix (GKD's lmbda).",
            shapes=("prompt_only", "prompt_completion", "conversation"),
            options=DistillOptions,
            sampling=lambda options: align.Sampling(
                1, rewards=False, on_policy_share=options.lmbda, teacher_samples=options.seq_kd
            ),
            needs_teacher=True,
            packable=True,
        )
    )


@align.hookimpl
def align_prepare_dataset(examples, options, split):
    """A share of rounds on the data's completions needs data with completions."""
    prompts_only = len(examples) and "prompt_input_ids" in examples[0]
    if options.lmbda < 1 and not options.seq_kd and split == "train" and prompts_only:
        raise align.ConfigError(
            f"distill: lmbda {options.lmbda:g} trains {1 - options.lmbda:.0%} of the steps on "
            "the data's completions, and the training data is prompts only; give "
            "prompt_completion or conversation data, lmbda 1 (every step on the student's "
            "samples) or seq_kd true (the other steps on the teacher's samples)"
        )
    return None


@align.hookimpl
def align_loss_counts(batch):
    from .loss import trained_positions

    return {"loss": trained_positions(batch)}


@align.hookimpl
def align_compute_loss(model, batch, options, run, teacher):
    from .loss import distill_loss

    return distill_loss(model, batch, options, teacher, run.config.temperature)
