"""Log-probs of the trained tokens straight from the hidden states: no full-vocabulary logits.

At a real vocabulary the output head dominates a step: a micro-batch of 8 × 2048 positions at
Qwen2.5's 151,936 tokens has 10 GB of float32 logits, most of them at prompt positions nothing
is trained on. Here only the positions whose next token is trained go through the head, a chunk
of rows at a time::

    z_t = post(W h_t + b) / τ          post: × logit_scale (Cohere), ÷ logits_scaling (Granite),
                                             c · tanh(z / c) (Gemma 2/3 final_logit_softcapping)
    log p(y_t) = z_t[y_t] − logsumexp(z_t)

The forward keeps one float32 logsumexp per row. The backward recomputes the logits and turns
them into ``g_t · (onehot(y_t) − softmax(z_t)) · post'/τ`` for the gradients of the hidden
states and of the head's parameters: for a plain ``nn.Linear`` head a block of vocabulary rows
at a time over all rows (the saved logsumexp makes each block's softmax exact on its own, and
each block of the weight's gradient is written once), for any other head (a PEFT wrapper)
through autograd, a chunk of rows at a time. The head's peak memory is O(chunk × vocabulary)
instead of O(rows × T × vocabulary), for one more matmul than the full logits need (the
recomputation). The matmul runs as the model's own head would (the autocast dtype under
autocast); everything after it is float32.

:func:`output_head` finds a model's head and what follows it; :func:`why_not_from_hidden` checks
it against the model's own logits with one probe forward, so a head this module does not
understand falls back to the full logits, with the reason logged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

CHUNK_ELEMENTS = 1 << 25  # logits elements of one chunk (128 MiB in float32)


@dataclass
class HeadLogps:
    """Per-row results of :func:`hidden_target_logps`: ``logps`` (float32, differentiable),
    ``predictions`` (the argmax token of each row, no gradient), ``entropy`` and
    ``mean_logits`` (the mean over the vocabulary of the row's logits, as scored: after the
    model's transforms and the temperature); both float32, no gradient, None unless asked."""

    logps: torch.Tensor
    predictions: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class OutputHead:
    """A model's output head: the module that maps hidden states to logits, and the
    element-wise transforms the model applies to its output (``scale`` multiplies, then
    ``softcap`` caps)."""

    module: torch.nn.Module
    scale: float | None = None
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The model's logits (float32) for ``hidden``, divided by ``temperature``; full
        vocabulary, differentiable: for callers that really need them all."""
        raw = self.module(hidden).float()
        return _post(raw, self.scale, self.softcap, temperature)[0]


def _post(
    raw: torch.Tensor, scale: float | None, softcap: float | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``post(raw) / τ`` and its element-wise derivative (a float when constant)."""
    z, derivative = raw, 1.0
    if scale is not None:
        z, derivative = z * scale, scale
    if softcap is not None:
        capped = torch.tanh(z / softcap)
        derivative = (1 - capped * capped) * derivative
        z = capped * softcap
    if temperature not in (0, 1, None):
        z, derivative = z / temperature, derivative / temperature
    return z, derivative


class _HeadTargetLogps(torch.autograd.Function):
    """See the module docstring. Inputs: hidden rows ``[N, H]``, targets ``[N]``, the head,
    settings, then the head's trainable parameters (so autograd routes their gradients)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, settings, *params):
        scale, softcap, temperature, want_entropy, want_mean, chunk = settings
        device = hidden.device
        ctx.autocast = (
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
        )
        rows = hidden.shape[0]
        logps = torch.zeros(rows, dtype=torch.float32, device=device)
        lse = torch.zeros(rows, dtype=torch.float32, device=device)
        predictions = torch.zeros(rows, dtype=torch.long, device=device)
        entropy = torch.zeros(rows, dtype=torch.float32, device=device) if want_entropy else None
        mean = torch.zeros(rows, dtype=torch.float32, device=device) if want_mean else None
        linear = _linear_parts(head)
        with torch.no_grad():
            for start, h in _chunks(hidden, chunk, head):
                end = start + h.shape[0]
                raw = _raw_logits(head, linear, h)
                z, _ = _post(raw.float(), scale, softcap, temperature)
                del raw
                picked = z.gather(-1, targets[start:end].unsqueeze(-1)).squeeze(-1)
                predictions[start:end] = z.argmax(-1)
                if mean is not None:
                    mean[start:end] = z.mean(-1)
                top = z.amax(-1, keepdim=True)
                shifted = z.sub_(top)  # in place: one float32 chunk at a time
                if entropy is None:
                    total = shifted.exp_().sum(-1)
                else:  # H = log Σe − Σ e·(z − top) / Σe, with e = exp(z − top)
                    total, dot = _exp_sums(shifted)
                    entropy[start:end] = total.log() - dot / total
                lse[start:end] = top.squeeze(-1) + total.log()
                logps[start:end] = picked - lse[start:end]
                del z, shifted
        ctx.head, ctx.settings = head, settings
        ctx.roles = _roles(params, linear)
        ctx.save_for_backward(hidden, targets, lse, *params)
        extra = tuple(t for t in (entropy, mean) if t is not None)
        ctx.mark_non_differentiable(predictions, *extra)
        return (logps, predictions, *extra)

    @staticmethod
    def backward(ctx, grad_logps, *_):
        hidden, targets, lse, *params = ctx.saved_tensors
        head = ctx.head
        scale, softcap, temperature, _, _, chunk = ctx.settings
        enabled, dtype = ctx.autocast
        linear = _linear_parts(head)
        if linear is not None:
            grads = _linear_backward(ctx, hidden, targets, lse, grad_logps, linear)
            return (grads[0], None, None, None, *grads[1:])
        # any other head (a PEFT wrapper, a quantised layer): autograd through it, row chunks
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        autocast = torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled)
        for start, h in _chunks(hidden, chunk, head):
            end = start + h.shape[0]
            g = grad_logps[start:end].float().unsqueeze(-1)
            with torch.enable_grad(), autocast:
                h_leaf = h.detach().requires_grad_(True)
                raw = _original_forward(head)(h_leaf)
            z, derivative = _post(raw.detach().float(), scale, softcap, temperature)
            # ∂ log p(y) / ∂ z = onehot(y) − softmax(z); times g and ∂z/∂raw, all in place
            grad_raw = z.sub_(lse[start:end].unsqueeze(-1)).exp_().mul_(-g)
            grad_raw.scatter_add_(-1, targets[start:end].unsqueeze(-1), g)
            if not isinstance(derivative, float) or derivative != 1.0:
                grad_raw.mul_(derivative)
            got = torch.autograd.grad(
                raw, [h_leaf, *params], grad_raw.to(raw.dtype), allow_unused=True
            )
            if grad_hidden is not None:
                grad_hidden[start:end] = got[0].to(hidden.dtype)
            for i, part in enumerate(got[1:]):
                if part is not None:
                    part = part.to(params[i].dtype)
                    grads[i] = part if grads[i] is None else grads[i].add_(part)
        return (grad_hidden, None, None, None, *grads)


CACHE_ELEMENTS = 1 << 18  # float32 elements of a block of rows that stays in a CPU's cache


def _exp_sums(shifted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ e`` and ``Σ e·s`` of each row ``s`` of ``shifted``, ``e = exp(s)``. On the CPU a block
    of rows at a time that stays in cache: ``e`` of a whole chunk would be a second chunk-sized
    allocation, whose first touch alone cost as much as the chunk's exp (measured: the entropy
    then added 80 ms of CPU time per 1,000 rows at a 32,000-token vocabulary, 2 ms this way).
    Elsewhere the whole chunk, one kernel each."""
    rows, vocab = shifted.shape
    step = max(1, CACHE_ELEMENTS // vocab) if shifted.device.type == "cpu" else max(rows, 1)
    total = shifted.new_empty(rows)
    dot = shifted.new_empty(rows)
    for start in range(0, rows, step):
        block = shifted[start : start + step]
        e = block.exp()
        total[start : start + step] = e.sum(-1)
        dot[start : start + step] = e.mul_(block).sum(-1)
    return total, dot


def _linear_backward(ctx, hidden, targets, lse, grad_logps, linear) -> list:
    """A plain ``nn.Linear`` head's backward, a block of vocabulary rows at a time: the
    saved logsumexp makes each block's softmax exact on its own, so every row goes through one
    matmul per block, each block of the weight's gradient is written once (no accumulation
    over chunks of rows), and only the block of the weight is cast to the matmul's dtype."""
    scale, softcap, temperature, _, _, _ = ctx.settings
    enabled, dtype = ctx.autocast
    weight, bias = (None if t is None else t.detach() for t in linear)
    compute = dtype if enabled else weight.dtype
    rows, vocab = hidden.shape[0], weight.shape[0]
    h = hidden.detach().to(compute)
    g = grad_logps.float()
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros_like(weight) if "weight" in ctx.roles else None
    grad_bias = torch.zeros_like(bias) if "bias" in ctx.roles else None
    step = max(1, CHUNK_ELEMENTS // max(rows, 1))
    for start in range(0, vocab, step):
        end = min(vocab, start + step)
        w = weight[start:end].to(compute)
        raw = torch.nn.functional.linear(
            h, w, None if bias is None else bias[start:end].to(compute)
        )
        z, derivative = _post(raw.float(), scale, softcap, temperature)
        del raw
        grad = z.sub_(lse.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))  # −g·softmax, in place
        inside = ((targets >= start) & (targets < end)).nonzero().squeeze(-1)
        grad.index_put_((inside, targets[inside] - start), g[inside], accumulate=True)  # +g·onehot
        if not isinstance(derivative, float) or derivative != 1.0:
            grad.mul_(derivative)
        del derivative
        grad_c = grad.to(compute)
        del grad, z
        grad_hidden.add_(grad_c @ w)
        if grad_weight is not None:
            grad_weight[start:end] = grad_c.T @ h
        if grad_bias is not None:
            grad_bias[start:end] = grad_c.sum(0)
    by_role = {"weight": grad_weight, "bias": grad_bias}
    first = grad_hidden.to(hidden.dtype) if ctx.needs_input_grad[0] else None
    return [first, *(by_role[role] for role in ctx.roles)]


def _roles(params: list[torch.Tensor], linear: Any) -> list[str]:
    """For a plain ``nn.Linear`` head: which of ``params`` is the weight and which the bias."""
    if linear is None:
        return []
    return ["weight" if p is linear[0] else "bias" for p in params]


def _linear_parts(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A plain ``nn.Linear`` head's weight and bias (its gradients are written directly);
    None for any other module (a PEFT wrapper, a quantised layer), which autograd runs."""
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    return None


def _raw_logits(head, linear, h: torch.Tensor) -> torch.Tensor:
    """The head's output for rows ``h``, as the model computes it (under its autocast)."""
    if linear is None:
        return _original_forward(head)(h)
    return torch.nn.functional.linear(h, *linear)


def _chunks(hidden: torch.Tensor, chunk: int | None, head: torch.nn.Module) -> Iterator:
    """``(start, rows)`` of ``hidden``, ``chunk`` rows at a time (default: ``CHUNK_ELEMENTS``
    logits a chunk)."""
    step = chunk or max(1, CHUNK_ELEMENTS // _vocab_size(head))
    for start in range(0, hidden.shape[0], step):
        yield start, hidden[start : start + step]


def _vocab_size(head: torch.nn.Module) -> int:
    for attribute in ("out_features", "num_embeddings"):
        value = getattr(head, attribute, None)
        if isinstance(value, int):
            return value
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 1 << 17


def hidden_target_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    entropy: bool = False,
    mean_logits: bool = False,
    chunk_rows: int | None = None,
) -> HeadLogps:
    """``log p(targets)`` for hidden rows ``[N, H]`` through ``head`` (see the module
    docstring), in chunks of ``chunk_rows`` rows (default: ``CHUNK_ELEMENTS`` logits a chunk).
    Differentiable with respect to ``hidden`` and the head's parameters. ``entropy`` and
    ``mean_logits``: also those of each row, from the same chunks of logits."""
    params = [p for p in head.parameters() if p.requires_grad]
    settings = (scale, softcap, temperature, entropy, mean_logits, chunk_rows)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        logps = empty + hidden.sum() * 0  # in the graph, so a backward reaches the model
        predictions = torch.zeros(0, dtype=torch.long, device=hidden.device)
        return HeadLogps(
            logps,
            predictions,
            empty.clone() if entropy else None,
            empty.clone() if mean_logits else None,
        )
    out = list(_HeadTargetLogps.apply(hidden, targets, head, settings, *params))
    logps, predictions = out.pop(0), out.pop(0)
    return HeadLogps(
        logps,
        predictions,
        out.pop(0) if entropy else None,
        out.pop(0) if mean_logits else None,
    )


# ---------------------------------------------------------------------------------------------
# Finding a model's head, and running the model's body alone.

_VERDICTS: dict[type, str] = {}  # model classes whose head is not understood, and why
_ORIGINAL_FORWARD = "_align_original_forward"


def inner_model(model: Any) -> Any:
    """The model inside DDP-style wrappers (``.module``; DeepSpeed's engine, which also
    forwards every other attribute to it, is recognised by its class name: importing DeepSpeed
    to check would slow every run's start)."""
    while hasattr(model, "module") and (
        not hasattr(model, "get_output_embeddings") or type(model).__name__ == "DeepSpeedEngine"
    ):
        model = model.module
    return model


def _model_class(model: Any) -> type:
    """The transformers class of ``model``, inside DDP-style and PEFT wrappers."""
    inner = inner_model(model)
    base = getattr(inner, "get_base_model", None)
    return type(base() if callable(base) else inner)


def output_head(model: Any) -> OutputHead | str:
    """``model``'s output head, or why it cannot be computed from the hidden states."""
    inner = inner_model(model)
    getter = getattr(inner, "get_output_embeddings", None)
    module = getter() if callable(getter) else None
    if not isinstance(module, torch.nn.Module):
        return f"{type(inner).__name__} has no output embeddings module"
    config = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)  # Cohere: logits × logit_scale
    scaling = getattr(text, "logits_scaling", None)  # Granite: logits ÷ logits_scaling
    if isinstance(scaling, int | float) and scaling != 1:
        scale = (scale or 1.0) / scaling
    softcap = getattr(text, "final_logit_softcapping", None)
    verdict = _VERDICTS.get(_model_class(model))
    if verdict:
        return verdict
    return OutputHead(
        module,
        float(scale) if isinstance(scale, int | float) and scale != 1 else None,
        float(softcap) if isinstance(softcap, int | float) and softcap else None,
    )


def _original_forward(module: torch.nn.Module) -> Callable:
    return getattr(module, _ORIGINAL_FORWARD, module.forward)


@contextlib.contextmanager
def head_replaced(module: torch.nn.Module, compute: Callable[[torch.Tensor], Any]) -> Iterator:
    """Within the block, the head's forward hands its input to ``compute`` (inside the model's
    forward: under its autocast, with FSDP's gathered weights) and returns empty logits; the
    yielded list receives what ``compute`` returned, once per call."""
    results: list[Any] = []

    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        results.append(compute(hidden))
        return hidden.new_zeros((*hidden.shape[:-1], 0))

    had_own = "forward" in vars(module)
    original = module.forward
    setattr(module, _ORIGINAL_FORWARD, original)
    module.forward = forward
    try:
        yield results
    finally:
        if had_own:
            module.forward = original
        else:
            del module.forward
        delattr(module, _ORIGINAL_FORWARD)


def why_not_from_hidden(model: Any, role: str = "model") -> str | None:
    """None when ``model``'s log-probs can be computed from its hidden states (:func:`output_head`
    understands its head); else why not, naming the model by ``role``. One no-grad forward of a
    short sequence compares the head computed here with the model's own logits; the verdict is
    remembered, so :func:`align.forward_logps` takes the full logits for a head that differs."""
    head = output_head(model)
    if isinstance(head, str):
        return f"the {role}: {head}"
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.is_meta:
        return None  # nothing to probe (FSDP's meta-device copies); the structure decides
    from .dropout import eval_mode

    vocab = _vocab_size(head.module)
    ids = torch.tensor([[(3 + 7 * i) % vocab for i in range(8)]], device=parameter.device)
    captured: list[torch.Tensor] = []
    hook = head.module.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    try:
        with torch.no_grad(), eval_mode(model):
            logits = model(input_ids=ids, use_cache=False).logits.float()
    except Exception as exc:  # noqa: BLE001 - the model's own forward: report, fall back
        return f"the {role} could not be probed ({type(exc).__name__}: {exc})"
    finally:
        hook.remove()
    reason = None
    if len(captured) != 1:
        reason = f"its forward called the output head {len(captured)} times, not once"
    else:
        with torch.no_grad():
            ours = head.logits(captured[0])
        tolerance = 1e-4 if parameter.dtype == torch.float32 else 5e-2
        difference = (ours - logits).abs().max().item() if ours.shape == logits.shape else None
        if difference is None or difference > tolerance * max(1.0, logits.abs().max().item()):
            reason = "its logits are not the output head's (an unknown transform follows it)"
    if reason is None:
        return None
    _VERDICTS[_model_class(model)] = f"{_model_class(model).__name__}: {reason}"
    return f"the {role}'s head is not understood: {reason}"


ZERO3_VERDICT = (
    "DeepSpeed ZeRO-3 gathers the head's weight only inside its forward, and the backward here "
    "needs it afterwards"
)


def decide_head(model: Any, role: str = "model", accelerator: Any = None) -> str | None:
    """:func:`why_not_from_hidden`, probed by the main process, its verdict taken by every
    process (all compute log-probs the same way, even where FSDP's ``cpu_ram_efficient_loading``
    leaves the others' weights on the meta device). Call it before FSDP shards the model."""
    if _zero3(accelerator):
        _VERDICTS[_model_class(model)] = ZERO3_VERDICT
        return f"the {role}: {ZERO3_VERDICT}"
    if _VERDICTS.get(_model_class(model)) == ZERO3_VERDICT:  # an earlier run in this process
        del _VERDICTS[_model_class(model)]
    if accelerator is None or accelerator.num_processes == 1:
        return why_not_from_hidden(model, role)
    from accelerate.utils import broadcast_object_list

    answer: list[str | None] = [None]
    if accelerator.is_main_process:
        answer[0] = why_not_from_hidden(model, role)
    broadcast_object_list(answer)
    if answer[0] is not None:
        _VERDICTS[_model_class(model)] = answer[0]
    return answer[0]


def _zero3(accelerator: Any) -> bool:
    """The run's model is partitioned by DeepSpeed ZeRO-3."""
    state = getattr(accelerator, "state", None)
    plugin = getattr(state, "deepspeed_plugin", None) if state is not None else None
    return plugin is not None and plugin.zero_stage == 3


def describe_head(model: Any) -> str:
    """One line for the run's log: how the log-probs are computed."""
    head = output_head(model)
    if isinstance(head, str):
        return f"log-probs: from the full logits ({head})"
    vocab = _vocab_size(head.module)
    rows = max(1, CHUNK_ELEMENTS // vocab)
    return (
        f"log-probs: from the hidden states, up to {rows} trained positions a chunk through "
        f"the {vocab}-token output head (no full-vocabulary logits)"
    )
