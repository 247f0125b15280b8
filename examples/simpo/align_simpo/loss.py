"""``L = −log σ(β/|y_w|·log πθ(y_w|x) − β/|y_l|·log πθ(y_l|x) − γ)`` (SimPO, eq. 6)."""

import torch.nn.functional as F

import align


def simpo_loss(model, batch, beta, gamma):
    out = align.forward_logps(model, batch)  # rows: [chosen; rejected]
    rewards = beta * out.sums / out.num_tokens
    n = len(rewards) // 2
    chosen, rejected = rewards[:n], rewards[n:]
    losses = -F.logsigmoid(chosen - rejected - gamma)
    chosen, rejected = chosen.detach(), rejected.detach()
    return align.LossOutput(
        loss=losses.sum(),
        count=n,
        metrics={
            "rewards/chosen": (chosen.sum(), n),
            "rewards/rejected": (rejected.sum(), n),
            "rewards/accuracies": ((chosen > rejected).sum(), n),
            "rewards/margins": ((chosen - rejected).sum(), n),
        },
    )
