"""Weighted SFT: ``L = Σ_i w_i·Σ_t −log πθ(y_t|x_i, y_<t) / Σ_i m_i`` (m_i: completion tokens)."""

from pydantic import Field

import align


class WeightField(align.Fields):  # the `weight` column of every record, validated by the core
    weight: float = Field(1.0, ge=0, description="How much the record counts (0: not at all).")


@align.hookimpl
def align_register_objectives(register):
    about = "SFT with each record's NLL scaled by its `weight` field (default 1)."
    register(align.Objective("weighted-sft", about, fields=WeightField, packable=True))


@align.hookimpl
def align_loss_counts(batch):  # the loss unit is a completion token, known before the forward
    return {"loss": align.sequence_token_counts(batch).sum()}


@align.hookimpl
def align_compute_loss(model, batch):  # batch["weight"]: one float per example, from the core
    out = align.forward_logps(model, batch)  # per sequence: sums = log πθ(y|x), num_tokens
    return align.LossOutput(loss=-(batch["weight"] * out.sums).sum(), count=out.num_tokens.sum())
