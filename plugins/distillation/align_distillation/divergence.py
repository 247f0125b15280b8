"""The generalised Jensen–Shannon divergence between a student's and a teacher's next-token
distributions, from their hidden states, a block of the vocabulary at a time.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", eq. 1), with TRL 1.16's ``beta`` convention. With ``P`` the teacher's
distribution and ``Q`` the student's at one position, both ``softmax(post(W h + b) / τ)``
(``post``: the model's own logit transforms, :class:`align.model.head.OutputHead`)::

    M   = β·P + (1 − β)·Q
    D_β = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M)      0 < β < 1   (β = 0.5: the Jensen–Shannon divergence)
    D_0 = KL(P ‖ Q) = Σ P (log P − log Q)       β = 0: forward KL, KL(teacher ‖ student)
    D_1 = KL(Q ‖ P) = Σ Q (log Q − log P)       β = 1: reverse KL, KL(student ‖ teacher)

TRL takes the two KLs themselves at the ends, as here: ``D_β`` itself vanishes as β → 0 or 1
(only ``D_β / β`` and ``D_β / (1 − β)`` tend to the KLs). In ``torch.nn.functional.kl_div``'s
order, ``KL(P ‖ Q)`` is ``kl_div(log Q, log P, log_target=True)``: TRL's GKD ``beta=0`` is
``kl_div(student_log_probs, teacher_log_probs)``, the forward KL.

Neither model's full ``[N, V]`` logits ever exist. With both heads plain ``nn.Linear``, each pass
goes over the vocabulary a block of ``chunk`` columns at a time, for all N positions:

1. forward, pass one: both models' row logsumexps (an online logsumexp over the blocks), the
   student's entropy, and for β ∈ {0, 1} the KL itself (``Σ e^{z−m}·(z_P − z_Q)`` folds into the
   same running sums);
2. forward, pass two (0 < β < 1 only): ``D_β`` and ``KL(Q ‖ M)`` per block, from the saved
   logsumexps (``log M`` needs both normalised distributions);
3. backward: each block's logits are recomputed and ``∂D/∂z_Q`` — ``Q − P`` (β = 0),
   ``Q·(log Q − log P − D)`` (β = 1), ``(1 − β)·Q·(log Q − log M − KL(Q ‖ M))`` else — times
   ``post'/τ`` gives the block's gradient of the head's output, from which the gradients of the
   student's hidden states (accumulated) and of its head's weight and bias (this block's rows,
   written once) follow.

Extra memory is O(N × chunk) (a few float32 tiles of both models) plus O(N) row statistics,
forward and backward; the price is recomputing the head matmuls: both models' twice in the
forward for 0 < β < 1 (once for the KLs) and once more in the backward. A head that is not a
plain ``nn.Linear`` (a PEFT-wrapped ``lm_head``, a quantised layer; either model's) cannot be cut
into vocabulary blocks: then, as in :mod:`align.model.head`, the positions go through it a chunk
of rows at a time over the whole vocabulary (the same element budget), and the student's backward
runs autograd through its head one chunk of rows at a time (recomputed, checkpoint-style).

The head matmuls run as the models' own heads would (the autocast dtype under autocast, each
model's on its own device; the teacher's logits are then moved to the student's device);
everything after them is float32, and the backward's matmuls accumulate in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align.model.head import CHUNK_ELEMENTS, OutputHead, _linear_parts, _original_forward, _post

# A model's float32 tile of logits holds at most this many elements by default: the two models'
# tiles together are head.py's CHUNK_ELEMENTS (128 MiB), each step's temporaries a few more.
TILE_ELEMENTS = CHUNK_ELEMENTS // 2


def generalized_jsd(
    student_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_hidden: torch.Tensor,
    teacher_head: OutputHead,
    beta: float,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalised JSD ``D_β(P_teacher, Q_student)`` at each of N positions (see the module
    docstring for the equation and TRL's ``beta``: 0 forward KL(teacher ‖ student), 1 reverse
    KL(student ‖ teacher), else the JSD with mixture ``M = β·P + (1 − β)·Q``).

    ``student_hidden`` ``[N, H_s]``: the student's final hidden states at the N positions in the
    loss (what its head takes), differentiable. ``teacher_hidden`` ``[N, H_t]``: the teacher's at
    the same positions (``H_t`` may differ; no gradient is taken through it). ``student_head``
    and ``teacher_head``: :func:`align.model.head.output_head` of each model; their vocabularies
    must have the same size. Both distributions are ``softmax(post(logits) / temperature)``.
    ``chunk``: vocabulary columns per block (default: ``TILE_ELEMENTS // N``, at least 1); for a
    head that is not a plain ``nn.Linear``, ``N × chunk`` logits per chunk of rows instead.

    Returns ``(divergence, entropy)``, both ``[N]`` float32 on the student's device:
    ``divergence`` is differentiable with respect to ``student_hidden`` and the student head's
    trainable parameters (nothing reaches the teacher); ``entropy`` is the student's
    ``H(Q) = −Σ Q log Q`` (of the tempered distribution), without gradient. No reduction and no
    mask: pass only the positions in the loss, and sum or average them as the objective does.
    The heads' weights must be whole when this runs and when its backward runs (as for
    :func:`align.model.head.hidden_target_logps`), and each head must give the same logits every
    time (the passes recompute them: no dropout inside a PEFT-wrapped head).

    Raises ``ValueError`` (its message starts ``generalized_jsd:``) for ``beta`` outside [0, 1],
    ``temperature`` ≤ 0 (for greedy sampling the caller passes 1), ``chunk`` < 1, hidden
    states that are not 2-D or not the same N positions, and heads of different vocabulary
    sizes."""
    _check(student_hidden, student_head, teacher_hidden, teacher_head, beta, temperature, chunk)
    rows = student_hidden.shape[0]
    if rows == 0:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return empty + student_hidden.sum() * 0, empty.clone()  # in the graph: a backward runs
    params = [p for p in student_head.module.parameters() if p.requires_grad]
    settings = _Settings(student_head, teacher_head, float(beta), float(temperature), chunk)
    return _GeneralizedJSD.apply(student_hidden, teacher_hidden.detach(), settings, *params)


def _check(student_hidden, student_head, teacher_hidden, teacher_head, beta, temperature, chunk):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must lie in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"generalized_jsd: temperature must be > 0, got {temperature}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"generalized_jsd: chunk must be a positive number, got {chunk}")
    for name, hidden in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if hidden.dim() != 2:
            raise ValueError(
                f"generalized_jsd: {name} must be [positions, hidden size], got shape "
                f"{tuple(hidden.shape)}"
            )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"generalized_jsd: student_hidden has {student_hidden.shape[0]} positions, "
            f"teacher_hidden {teacher_hidden.shape[0]}: they must be the same positions"
        )
    student_vocab, teacher_vocab = _vocab(student_head), _vocab(teacher_head)
    if None not in (student_vocab, teacher_vocab) and student_vocab != teacher_vocab:
        raise ValueError(
            f"generalized_jsd: the student's head has {student_vocab} output tokens, the "
            f"teacher's {teacher_vocab}: the divergence compares distributions over one "
            "vocabulary"
        )


def _vocab(head: OutputHead) -> int | None:
    """The number of logits ``head`` makes; None when it cannot be read off the module (a
    non-linear head: checked on its first output instead)."""
    linear = _linear_parts(head.module)
    if linear is not None:
        return int(linear[0].shape[0])
    value = getattr(head.module, "out_features", None)
    return value if isinstance(value, int) else None


@dataclass(frozen=True)
class _Settings:
    student: OutputHead
    teacher: OutputHead
    beta: float
    temperature: float
    chunk: int | None


class _Tiles:
    """How a pass walks the ``[N, V]`` logits of both models, and each tile's float32 logits.

    Both heads plain ``nn.Linear``: all rows, ``chunk`` vocabulary columns a tile. Otherwise all
    columns, ``N × chunk // V`` rows a tile (at least one row). The autocast state the forward
    ran under is kept, so the backward recomputes the same logits."""

    def __init__(self, settings: _Settings, student_hidden, teacher_hidden, autocast=None):
        self.settings = settings
        self.student_hidden, self.teacher_hidden = student_hidden, teacher_hidden
        self.student_linear = _linear_parts(settings.student.module)
        self.teacher_linear = _linear_parts(settings.teacher.module)
        self.autocast = autocast or {
            device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            for device in {student_hidden.device.type, teacher_hidden.device.type}
        }
        self.rows = student_hidden.shape[0]
        self.by_columns = self.student_linear is not None and self.teacher_linear is not None
        self.vocab = (
            int(self.student_linear[0].shape[0]) if self.student_linear is not None else None
        )
        if self.vocab is None and self.teacher_linear is not None:
            self.vocab = int(self.teacher_linear[0].shape[0])

    def spans(self):
        """``(rows, columns)`` slices of each tile; columns ``slice(None)`` for whole rows."""
        chunk = self.settings.chunk
        if self.by_columns:
            step = chunk or max(1, TILE_ELEMENTS // self.rows)
            for start in range(0, self.vocab, step):
                yield slice(None), slice(start, min(start + step, self.vocab))
            return
        budget = self.rows * chunk if chunk else TILE_ELEMENTS
        vocab = self.vocab or self._probe_vocab()
        step = max(1, budget // vocab)
        for start in range(0, self.rows, step):
            yield slice(start, min(start + step, self.rows)), slice(None)

    def _probe_vocab(self) -> int:
        with torch.no_grad():
            raw = self.raw("student", slice(0, 1), slice(None))
        return int(raw.shape[-1])

    def autocast_for(self, device: torch.device):
        enabled, dtype = self.autocast[device.type]
        return torch.autocast(device.type, dtype=dtype, enabled=enabled)

    def raw(self, role: str, rows: slice, columns: slice, hidden=None) -> torch.Tensor:
        """The head's output for the tile, as the model computes it (its dtype, its device)."""
        head = self.settings.student if role == "student" else self.settings.teacher
        linear = self.student_linear if role == "student" else self.teacher_linear
        if hidden is None:
            hidden = (self.student_hidden if role == "student" else self.teacher_hidden)[rows]
        with self.autocast_for(hidden.device):
            if linear is None:
                return _original_forward(head.module)(hidden)
            weight, bias = linear
            return torch.nn.functional.linear(
                hidden, weight[columns], None if bias is None else bias[columns]
            )

    def teacher_logits(self, rows: slice, columns: slice) -> torch.Tensor:
        """The teacher's float32 tile ``post(raw) / τ``, on the student's device."""
        raw = self.raw("teacher", rows, columns)
        head = self.settings.teacher
        z, _ = _post(raw.float(), head.scale, head.softcap, self.settings.temperature)
        return z.to(self.student_hidden.device)

    def student_logits(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The student's float32 tile ``post(raw) / τ`` and ``post'(raw) / τ``; the tile may be
        ``raw`` itself (float32, no transform), which callers then work on in place."""
        head = self.settings.student
        return _post(raw.float(), head.scale, head.softcap, self.settings.temperature)


def _mode(beta: float) -> str:
    return "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"


class _GeneralizedJSD(torch.autograd.Function):
    """See the module docstring. Inputs: the student's hidden rows ``[N, H_s]``, the teacher's
    ``[N, H_t]``, the settings, then the student head's trainable parameters (so autograd routes
    their gradients)."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, settings, *params):
        tiles = _Tiles(settings, student_hidden, teacher_hidden)
        device, rows = student_hidden.device, student_hidden.shape[0]
        mode = _mode(settings.beta)

        def zeros():
            return torch.zeros(rows, dtype=torch.float32, device=device)

        # online logsumexp per row: running max m, Σ e^{z−m}, and the sums weighted by e^{z−m}
        s_max, t_max = zeros() - math.inf, zeros() - math.inf
        s_sum, t_sum = zeros(), zeros()
        s_shifted = zeros()  # Σ e^{z_Q − m_Q}·(z_Q − m_Q): the entropy
        gap = zeros()  # β = 0: Σ e^{z_P − m_P}·(z_P − z_Q); β = 1: Σ e^{z_Q − m_Q}·(z_Q − z_P)
        with torch.no_grad():
            for r, c in tiles.spans():
                zt = tiles.teacher_logits(r, c)
                zs, _ = tiles.student_logits(tiles.raw("student", r, c))
                _check_tile(zs, zt)
                new_s = torch.maximum(s_max[r], zs.amax(-1))
                new_t = torch.maximum(t_max[r], zt.amax(-1))
                # rescale the running sums to the new maxima: Σ e^{z−m'} = e^{m−m'}·Σ e^{z−m}, and
                # Σ e^{z−m'}·(z − m') = e^{m−m'}·(Σ e^{z−m}·(z − m) + (m − m')·Σ e^{z−m})
                s_step, t_step = s_max[r] - new_s, t_max[r] - new_t  # −inf on a row's first tile
                s_rescale, t_rescale = s_step.exp(), t_step.exp()
                s_step = s_step.nan_to_num(neginf=0.0)  # a row's first tile: nothing to rescale
                s_shifted[r] = s_rescale * (s_shifted[r] + s_sum[r] * s_step)
                s_sum[r] *= s_rescale
                t_sum[r] *= t_rescale
                gap[r] *= s_rescale if mode == "reverse_kl" else t_rescale
                difference = None
                if mode == "forward_kl":
                    difference = zt - zs
                elif mode == "reverse_kl":
                    difference = zs - zt
                shifted = zs.sub_(new_s.unsqueeze(-1))  # z_Q − m_Q, in place
                es = shifted.exp()
                s_shifted[r] += (es * shifted).sum(-1)
                s_sum[r] += es.sum(-1)
                if mode == "reverse_kl":
                    gap[r] += (es * difference).sum(-1)
                del shifted, es
                et = zt.sub_(new_t.unsqueeze(-1)).exp_()
                t_sum[r] += et.sum(-1)
                if mode == "forward_kl":
                    gap[r] += (et * difference).sum(-1)
                del et, difference
                s_max[r], t_max[r] = new_s, new_t
            s_lse, t_lse = s_max + s_sum.log(), t_max + t_sum.log()
            entropy = s_sum.log() - s_shifted / s_sum
            if mode == "forward_kl":  # Σ P (z_P − z_Q) − lse_P + lse_Q
                divergence = gap / t_sum - t_lse + s_lse
                aux = divergence
            elif mode == "reverse_kl":  # Σ Q (z_Q − z_P) − lse_Q + lse_P
                divergence = gap / s_sum - s_lse + t_lse
                aux = divergence
            else:
                divergence, aux = zeros(), zeros()
                for r, c in tiles.spans():
                    zt = tiles.teacher_logits(r, c)
                    zs, _ = tiles.student_logits(tiles.raw("student", r, c))
                    log_q = zs.sub_(s_lse[r].unsqueeze(-1))
                    log_p = zt.sub_(t_lse[r].unsqueeze(-1))
                    log_m = _log_mixture(log_p, log_q, settings.beta)
                    kl_p = _kl_terms(log_p, log_m).sum(-1)  # KL(P ‖ M)
                    kl_q = _kl_terms(log_q, log_m).sum(-1)  # KL(Q ‖ M)
                    divergence[r] += settings.beta * kl_p + (1 - settings.beta) * kl_q
                    aux[r] += kl_q
                    del log_q, log_p, log_m
        ctx.settings, ctx.autocast = settings, tiles.autocast
        ctx.roles = _roles(params, tiles.student_linear)
        ctx.save_for_backward(student_hidden, teacher_hidden, s_lse, t_lse, aux, *params)
        ctx.mark_non_differentiable(entropy)
        return divergence, entropy

    @staticmethod
    def backward(ctx, grad_divergence, _grad_entropy):
        student_hidden, teacher_hidden, s_lse, t_lse, aux, *params = ctx.saved_tensors
        settings = ctx.settings
        tiles = _Tiles(settings, student_hidden, teacher_hidden, ctx.autocast)
        g = grad_divergence.float()
        beta, mode = settings.beta, _mode(settings.beta)

        def grad_of_logits(raw, r, c):
            """``g · ∂D/∂z_Q · post'(raw)/τ`` for the tile, float32."""
            zt = tiles.teacher_logits(r, c)
            zs, derivative = tiles.student_logits(raw)
            log_q = zs.sub_(s_lse[r].unsqueeze(-1))
            log_p = zt.sub_(t_lse[r].unsqueeze(-1))
            if mode == "forward_kl":  # Q − P
                grad = log_q.exp().sub_(log_p.exp_())
            elif mode == "reverse_kl":  # Q·(log Q − log P − D)
                grad = log_q.exp().mul_(log_q.sub_(log_p).sub_(aux[r].unsqueeze(-1)))
            else:  # (1 − β)·Q·(log Q − log M − KL(Q ‖ M))
                log_m = _log_mixture(log_p, log_q, beta)
                grad = log_q.exp().mul_(log_q.sub_(log_m).sub_(aux[r].unsqueeze(-1)))
                grad.mul_(1 - beta)
                del log_m
            del log_q, log_p
            grad.mul_(g[r].unsqueeze(-1))
            if not isinstance(derivative, float) or derivative != 1.0:
                grad.mul_(derivative)
            return grad

        if tiles.student_linear is not None:
            grads = _linear_backward(ctx, tiles, student_hidden, grad_of_logits)
            return (grads[0], None, None, *grads[1:])
        # any other head (a PEFT wrapper, a quantised layer): autograd through it, row chunks
        grad_hidden = torch.zeros_like(student_hidden) if ctx.needs_input_grad[0] else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        for r, c in tiles.spans():
            with torch.enable_grad():
                leaf = student_hidden[r].detach().requires_grad_(True)
                raw = tiles.raw("student", r, c, hidden=leaf)
            with torch.no_grad():
                # a copy: the in-place float32 work must not touch the graph's output
                grad_raw = grad_of_logits(raw.detach().to(torch.float32, copy=True), r, c)
            got = torch.autograd.grad(
                raw, [leaf, *params], grad_raw.to(raw.dtype), allow_unused=True
            )
            if grad_hidden is not None:
                grad_hidden[r] = got[0].to(student_hidden.dtype)
            for i, part in enumerate(got[1:]):
                if part is not None:
                    part = part.to(params[i].dtype)
                    grads[i] = part if grads[i] is None else grads[i].add_(part)
        return (grad_hidden, None, None, *grads)


def _check_tile(zs: torch.Tensor, zt: torch.Tensor) -> None:
    if zs.shape != zt.shape:
        raise ValueError(
            f"generalized_jsd: the student's head gives {zs.shape[-1]} logits a position, the "
            f"teacher's {zt.shape[-1]}: the divergence compares distributions over one vocabulary"
        )


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """``log M = log(β·P + (1 − β)·Q)``, elementwise and stable (GKD's: ``log1p(−β)``)."""
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """The terms ``A·(log A − log B)`` of ``KL(A ‖ B)`` (``kl_div(log B, log A, log_target=True)``
    unreduced)."""
    return log_a.exp() * (log_a - log_b)


def _roles(params: list[torch.Tensor], linear) -> list[str]:
    """For a plain ``nn.Linear`` head: which of ``params`` is the weight and which the bias."""
    if linear is None:
        return []
    return ["weight" if p is linear[0] else "bias" for p in params]


_MM_OUT_DTYPE = torch.__version__ >= "2.8"  # torch.mm(..., out_dtype=float32) on CUDA


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float32 from ``a`` and ``b`` in their (matmul) dtype: a half-precision product
    is not rounded to half precision before it is summed with other blocks'."""
    if _MM_OUT_DTYPE and a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b`` for a float32 ``total``, the product accumulated in float32."""
    if _MM_OUT_DTYPE and a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total.addmm_(a.float(), b.float())


def _linear_backward(ctx, tiles: _Tiles, student_hidden: torch.Tensor, grad_of_logits) -> list:
    """A plain ``nn.Linear`` student head's backward, tile by tile: each tile's logits are
    recomputed as in the forward, their gradient ``grad_of_logits`` goes into the hidden states'
    gradient (accumulated over the vocabulary blocks in float32) and into the weight's and bias's
    rows of the block (written once when a tile holds all rows; accumulated over chunks of rows
    otherwise, when the teacher's head is not a plain ``nn.Linear``)."""
    weight, bias = tiles.student_linear
    grad_hidden = (
        torch.zeros(student_hidden.shape, dtype=torch.float32, device=student_hidden.device)
        if ctx.needs_input_grad[0]
        else None
    )
    if "weight" not in ctx.roles:
        grad_weight = None
    elif tiles.by_columns:  # each block's rows of the gradient are written once
        grad_weight = torch.empty_like(weight)
    else:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_bias = (
        torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        if "bias" in ctx.roles
        else None
    )
    hidden = None  # the hidden states in the matmul's dtype, made on the first tile
    for r, c in tiles.spans():
        with torch.no_grad():
            raw = tiles.raw("student", r, c)
            if hidden is None:
                hidden = student_hidden.detach().to(raw.dtype)
            grad = grad_of_logits(raw, r, c)
            del raw
            if grad_bias is not None:
                grad_bias[c] += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                _accumulate(grad_hidden[r], grad, weight[c].detach().to(hidden.dtype))
            if grad_weight is not None:
                part = _product(grad.T, hidden[r])
                if tiles.by_columns:
                    grad_weight[c] = part.to(weight.dtype)
                else:
                    grad_weight[c] += part
            del grad
    by_role = {
        "weight": None if grad_weight is None else grad_weight.to(weight.dtype),
        "bias": None if grad_bias is None else grad_bias.to(bias.dtype),
    }
    first = None if grad_hidden is None else grad_hidden.to(student_hidden.dtype)
    return [first, *(by_role[role] for role in ctx.roles)]
