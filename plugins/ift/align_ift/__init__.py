"""Intuitive Fine-Tuning: the ``ift`` objective (Hua et al. 2024; shared/objectives.md §5).

Registered through the ``align`` entry-point group; the loss lives in ``align_ift.loss`` and
imports torch only when a run needs it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

import align


class IFTOptions(align.Options):
    lambda_: float = Field(
        0.2,
        ge=0,
        le=1,
        alias="lambda",
        description="λ, the share of the model's own prediction in each completion position's "
        "input embedding (temporal residual connection).",
    )
    lambda_schedule: Literal["constant", "linear"] = Field(
        "constant",
        description="constant: λ throughout; linear: from lambda_start to λ over the run's "
        "learning-rate warm-up steps.",
    )
    lambda_start: float = Field(0.0, ge=0, le=1, description="λ at step 0 when linear.")
    gamma: float = Field(
        0.95,
        ge=0,
        le=1,
        description="γ, the discount of relation propagation; 0 weights every token 1.",
    )
    prediction: Literal["greedy", "expected"] = Field(
        "greedy",
        description="greedy: mix in the embedding of the argmax prediction (official code); "
        "expected: the probability-weighted embedding (the paper's notation).",
    )


def current_lambda(options: IFTOptions, run: align.Run) -> float:
    """λ at this step: constant, or a linear warm-up over the learning-rate warm-up.

    ``run.step`` is the number of optimizer steps taken (during evaluation, those before it).
    The official code warms λ up over ``warmup_steps`` only; here ``warmup_ratio`` counts too.
    """
    if options.lambda_schedule == "constant":
        return options.lambda_
    cfg = run.config
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * run.max_steps)
    progress = min(1.0, run.step / warmup) if warmup else 1.0
    return options.lambda_start + (options.lambda_ - options.lambda_start) * progress


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="ift",
            description="Intuitive Fine-Tuning: SFT on inputs mixed with the model's own "
            "predictions, with relation-propagation token weights.",
            shapes=("prompt_completion", "conversation"),
            options=IFTOptions,
            disable_dropout=True,
        )
    )


@align.hookimpl
def align_prepare_dataset(options, config):
    if options.lambda_schedule == "linear" and not (config.warmup_steps or config.warmup_ratio):
        raise align.ConfigError(
            "ift: lambda_schedule=linear warms λ up over the learning-rate warm-up, and this run "
            "has none; set --warmup-steps or --warmup-ratio, or use lambda_schedule=constant"
        )


@align.hookimpl
def align_prepare_model(model, config):
    """Untied input embeddings get no gradient under IFT's detached lookups: freeze them, so the
    optimizer holds no state for them and data-parallel runs see no unused parameter."""
    if getattr(config, "objective", None) != "ift":
        return None
    table = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not table:
        table.requires_grad_(False)
    return None


@align.hookimpl
def align_compute_loss(model, batch, options, run):
    from .loss import ift_loss

    embeddings = run.accelerator.unwrap_model(model).get_input_embeddings()
    return ift_loss(
        model,
        embeddings,
        batch,
        current_lambda(options, run),
        options.gamma,
        options.prediction,
    )
