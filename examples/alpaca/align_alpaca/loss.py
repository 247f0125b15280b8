"""``L = −(1/N_tok) Σ_batch Σ_{t∈output} log πθ(y_t | x, y_<t)``: SFT's token mean.

The hook returns the numerator and its count (the completion tokens, as ``align_loss_counts``
gave them before the forward); the core divides by the count summed over the accumulated batch
and all processes.
"""

from typing import Any

import align


def sft_loss(model: Any, batch: dict[str, Any]) -> align.LossOutput:
    out = align.forward_logps(model, batch)
    correct = ((out.predictions == out.targets) * out.mask).sum()
    return align.LossOutput(
        loss=-out.sums.sum(),
        count=out.num_tokens.sum(),
        metrics={"mean_token_accuracy": (correct, out.num_tokens.sum())},
    )
