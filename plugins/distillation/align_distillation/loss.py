"""The ``distill`` loss: TRL 1.16 ``DistillationTrainer``'s, the generalised JSD between the
student's and the teacher's distributions (both at the run's ``temperature``, as TRL scores
them at its sampling temperature) at every trained completion position, a token mean over the
optimizer step (the core divides the sum by the step's trained tokens over every micro-batch
and process), and ``entropy``, the student's mean per-token entropy."""

from __future__ import annotations

from typing import Any

import torch

import align


def trained_positions(batch: dict[str, Any]) -> torch.Tensor:
    """The positions whose next token is trained: the loss's units, in either layout."""
    if "target_mask" in batch:
        return batch["target_mask"].sum()
    return batch["completion_mask"][:, 1:].sum()


def distill_loss(
    model: Any, batch: dict[str, Any], options: Any, teacher: Any, temperature: float
) -> align.LossOutput:
    """Σ per-token divergence and the number of trained tokens; ``entropy`` (sum, count)."""
    from align.model.head import output_head

    from .divergence import generalized_jsd

    if teacher is None:
        raise align.PluginError("distill: the run has no teacher (--teacher PATH)")
    tau = 1.0 if temperature in (0, None) else float(temperature)  # greedy sampling: as 1
    teacher_rows = teacher.hidden(batch)

    def divergence(student_rows: torch.Tensor, head: Any) -> Any:
        return generalized_jsd(
            student_rows, head, teacher_rows, teacher.head, beta=options.beta, temperature=tau
        )

    head = output_head(model)  # checked here: the divergence's own ValueErrors pass through
    if isinstance(head, str):
        raise align.PluginError(
            f"distill: the policy's output head is not understood ({head}); the divergence is "
            "computed from its hidden states"
        )
    per_token, entropy = align.forward_hidden(model, batch, compute=divergence)
    count = torch.tensor(per_token.shape[0], device=per_token.device)
    return align.LossOutput(
        loss=per_token.sum(), count=count, metrics={"entropy": (entropy.sum(), count)}
    )
