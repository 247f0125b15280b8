"""Odds Ratio Preference Optimization: the ``orpo`` objective (Hong et al. 2024).

Registered through the ``align`` entry-point group. SFT and preference alignment in one loss and
one forward over ``[chosen; rejected]``, without a reference model: the NLL of the chosen answer
plus λ times the odds-ratio term (``align_orpo.loss``). With ``nll_on_prompt`` the plugin builds
its own padded batches (``align_orpo.batch``), as TRL's ORPOTrainer trains the prompt too.
"""

from __future__ import annotations

from pydantic import Field

import align


class ORPOOptions(align.Options):
    beta: float = Field(
        0.1,
        gt=0,
        description="λ: the weight of the odds-ratio term against the NLL (TRL's beta).",
    )
    nll_on_prompt: bool = Field(
        False,
        description="Train the NLL on every chosen token after the first, prompt included, as "
        "TRL's ORPOTrainer does (padded batches only); default: chosen completion tokens only.",
    )


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="orpo",
            description="Odds Ratio Preference Optimization: SFT plus an odds-ratio preference "
            "term on prompt/chosen/rejected pairs, without a reference model.",
            shapes=("preference",),
            options=ORPOOptions,
            needs_reference=False,
            packable=True,
            disable_dropout=True,
        )
    )


@align.hookimpl
def align_build_batch(examples, tokenizer, options):
    if not options.nll_on_prompt:
        return None  # the core's batch, padded or packed
    from .batch import prompt_nll_batch

    return prompt_nll_batch(examples, tokenizer.pad_token_id)


@align.hookimpl
def align_loss_counts(batch, options):
    counts = align.sequence_token_counts(batch)
    pairs = len(counts) // 2
    return {"nll": counts[:pairs].sum(), "odds_ratio": pairs}


@align.hookimpl
def align_compute_loss(model, batch, options):
    from .loss import orpo_loss

    return orpo_loss(model, batch, options.beta)
