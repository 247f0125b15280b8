"""The blockwise generalised JSD (``align_distillation.divergence.generalized_jsd``) against TRL
1.16 live: its chunked divergence (``_chunked_divergence_loss``, ``ChunkedDivergenceFunction``'s
CPU path) and GKD's ``generalized_jsd_loss`` on the full logits, in value and in the gradients of
the student's hidden states, head weight and bias, at a 50,021-token vocabulary; that the block
size changes nothing; that no tensor of ``N × V`` elements is ever made; that heads which are not
a plain ``nn.Linear`` (PEFT LoRA on the head, a wrapped teacher head) and autocast take their own
paths and give the same numbers; and the student's entropy."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from align.model.head import OutputHead

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before the package is installed
from align_distillation.divergence import generalized_jsd  # noqa: E402

VOCAB = 50_021  # not a multiple of any block size: the last block is ragged
ROWS, STUDENT_WIDTH, TEACHER_WIDTH = 64, 32, 48
BETAS = (0.0, 0.5, 1.0, 0.3)
TEMPERATURES = (1.0, 0.7)
# (student scale, student softcap, teacher scale, teacher softcap): none, or all of them
TRANSFORMS = {"plain": (None, None, None, None), "scale+softcap": (0.8, 30.0, 1.25, 20.0)}


def _models(seed: int = 0, vocab: int = VOCAB, bias: bool = True):
    """A student head and a wider teacher head that roughly agree (the teacher's weight extends
    the student's, with noise), and hidden states at ROWS positions: overlapping distributions,
    as in distillation, so every term of the divergence and its gradient matters."""
    generator = torch.Generator().manual_seed(seed)

    def noise(*shape, std=1.0):
        return torch.randn(*shape, generator=generator) * std

    student = torch.nn.Linear(STUDENT_WIDTH, vocab, bias=bias)
    teacher = torch.nn.Linear(TEACHER_WIDTH, vocab, bias=bias)
    with torch.no_grad():
        student.weight.copy_(noise(vocab, STUDENT_WIDTH, std=0.4))
        teacher.weight[:, :STUDENT_WIDTH] = student.weight + noise(vocab, STUDENT_WIDTH, std=0.1)
        teacher.weight[:, STUDENT_WIDTH:] = noise(vocab, TEACHER_WIDTH - STUDENT_WIDTH, std=0.1)
        if bias:
            student.bias.copy_(noise(vocab, std=0.5))
            teacher.bias.copy_(student.bias + noise(vocab, std=0.2))
    teacher.requires_grad_(False)
    student_hidden = noise(ROWS, STUDENT_WIDTH).requires_grad_(True)
    extra = noise(ROWS, TEACHER_WIDTH - STUDENT_WIDTH)
    teacher_hidden = torch.cat([student_hidden.detach(), extra], -1)
    return student, teacher, student_hidden, teacher_hidden


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Equal to ``tolerance``, relative to the expected tensor's largest entry (a gradient's
    entries span many orders of magnitude: an absolute 1e-5 would pass tiny wrong ones)."""
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_equals_trl_chunked_and_gkd_full_logits(beta, temperature, transform):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    s_scale, s_cap, t_scale, t_cap = TRANSFORMS[transform]
    student, teacher, hidden, teacher_hidden = _models()
    student_head = OutputHead(student, s_scale, s_cap)
    teacher_head = OutputHead(teacher, t_scale, t_cap)
    mask = (torch.arange(ROWS) % 5 != 3).float()  # some positions out of the loss
    wrt = (hidden, student.weight, student.bias)

    divergence, entropy = generalized_jsd(
        hidden, student_head, teacher_hidden, teacher_head, beta, temperature
    )
    assert divergence.shape == entropy.shape == (ROWS,)
    assert divergence.dtype == entropy.dtype == torch.float32
    assert not entropy.requires_grad
    ours = _masked_mean(divergence, mask)
    ours_grads = _grads(ours, *wrt)

    # TRL's chunked divergence (CPU path), per position and reduced as DistillationTrainer does
    trl_settings = dict(
        beta=beta,
        temperature=temperature,
        student_logit_scale=s_scale or 1.0,
        teacher_logit_scale=t_scale or 1.0,
        student_final_logit_softcapping=s_cap,
        teacher_final_logit_softcapping=t_cap,
    )
    trl_divergence, trl_entropy = ChunkedDivergenceFunction.apply(
        hidden,
        student.weight,
        student.bias,
        teacher_hidden,
        teacher.weight,
        teacher.bias,
        beta,
        temperature,
        s_scale or 1.0,
        s_cap,
        t_scale or 1.0,
        t_cap,
    )
    _close(divergence, trl_divergence.detach())
    _close(entropy, trl_entropy)
    trl_loss, trl_entropy_sum, _ = _chunked_divergence_loss(
        hidden[None],
        teacher_hidden[None],
        student.weight,
        teacher.weight,
        mask[None],
        student_lm_head_bias=student.bias,
        teacher_lm_head_bias=teacher.bias,
        **trl_settings,
    )
    _close(ours.detach(), trl_loss.detach())
    _close((entropy * mask).sum(), trl_entropy_sum.detach())
    for got, expected in zip(ours_grads, _grads(trl_loss, *wrt), strict=True):
        _close(got, expected)

    # GKD's generalized_jsd_loss on the full logits (both models' transforms applied first), in
    # float64: the exact value. In float32 GKD's own gradients miss it by up to 2e-5 of their
    # largest entry here (measured), ours and TRL's chunked ones by less than 1e-5.
    exact_student, exact_teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    exact_hidden = hidden.detach().double().requires_grad_(True)
    labels = torch.where(mask.bool(), 0, -100)[None]
    gkd_loss = GKDTrainer.generalized_jsd_loss(
        _logits(exact_student, exact_hidden, s_scale, s_cap)[None],
        _logits(exact_teacher, teacher_hidden.double(), t_scale, t_cap)[None],
        labels=labels,
        beta=beta,
        temperature=temperature,
    )
    _close(ours.detach(), gkd_loss.detach().float())
    exact = (exact_hidden, exact_student.weight, exact_student.bias)
    for got, expected in zip(ours_grads, _grads(gkd_loss, *exact), strict=True):
        _close(got, expected.float())


def _logits(head: torch.nn.Module, hidden: torch.Tensor, scale, softcap) -> torch.Tensor:
    """The full logits with the model's transforms, in the head's dtype (float64 here)."""
    logits = head(hidden)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def test_beta_ends_are_the_two_kls_and_entropy_is_the_students():
    """TRL's convention, by hand on the full logits: β = 0 is KL(teacher ‖ student), β = 1
    KL(student ‖ teacher), 0.5 the JSD (at most log 2); the entropy is the tempered student's."""
    student, teacher, hidden, teacher_hidden = _models(seed=1, vocab=5_000)
    heads = OutputHead(student), OutputHead(teacher)
    temperature = 0.7
    with torch.no_grad():
        log_q = torch.log_softmax(heads[0].logits(hidden, temperature), -1)
        log_p = torch.log_softmax(heads[1].logits(teacher_hidden, temperature), -1)
        log_m = torch.log(0.5 * log_p.exp() + 0.5 * log_q.exp())
        expected = {
            0.0: (log_p.exp() * (log_p - log_q)).sum(-1),
            1.0: (log_q.exp() * (log_q - log_p)).sum(-1),
            0.5: 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1)
            + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1),
        }
        entropy = -(log_q.exp() * log_q).sum(-1)
    for beta, divergence in expected.items():
        got, got_entropy = generalized_jsd(
            hidden, heads[0], teacher_hidden, heads[1], beta, temperature, chunk=777
        )
        _close(got.detach(), divergence)
        _close(got_entropy, entropy)
    assert (expected[0.0] - expected[1.0]).abs().max() > 1e-2  # the two KLs differ here
    assert expected[0.5].max() <= math.log(2)


def test_block_size_changes_nothing():
    student, teacher, hidden, teacher_hidden = _models(seed=2)
    heads = OutputHead(student, 0.9, 25.0), OutputHead(teacher)
    results = []
    for chunk in (1000, VOCAB):
        divergence, entropy = generalized_jsd(
            hidden, heads[0], teacher_hidden, heads[1], 0.3, 0.7, chunk=chunk
        )
        weights = torch.linspace(-1, 2, ROWS)  # any upstream gradient, not only a mean's
        grads = _grads((divergence * weights).sum(), hidden, student.weight, student.bias)
        results.append((divergence.detach(), entropy, *grads))
    for blockwise, whole in zip(*results, strict=True):
        _close(blockwise, whole, 1e-6)


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation makes, and how many operations ran."""

    def __init__(self):
        super().__init__()
        self.largest, self.calls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_no_tensor_of_full_logits_forward_or_backward(beta):
    """Every tensor made, forward and backward, holds at most max(N × chunk, V × H_s) elements
    (a block of logits, or the head weight's gradient): never N × V."""
    student, teacher, hidden, teacher_hidden = _models(seed=3)
    chunk = 1000
    heads = OutputHead(student, None, 30.0), OutputHead(teacher, 1.5)
    with _LargestTensor() as forward:
        divergence, _ = generalized_jsd(
            hidden, heads[0], teacher_hidden, heads[1], beta, 0.7, chunk=chunk
        )
    with _LargestTensor() as backward:
        divergence.sum().backward()
    bound = max(ROWS * chunk, VOCAB * STUDENT_WIDTH)
    assert bound < ROWS * VOCAB
    assert backward.calls > 100  # the backward's operations were seen (one matmul per block)
    assert forward.largest <= bound and backward.largest <= bound
    assert student.weight.grad is not None and student.bias.grad is not None


def _lora_student(student: torch.nn.Linear):
    """The student head inside a module, LoRA-wrapped by PEFT (``lora.Linear``: not a plain
    ``nn.Linear``), its adapter made non-zero so it matters."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = torch.nn.Module()
    holder.lm_head = student
    # seeded here, PEFT's initialisation of lora_A included: the test's values must not
    # depend on the tests that ran before it in the same process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"])
        inject_adapter_in_model(config, holder)
        with torch.no_grad():
            holder.lm_head.lora_B["default"].weight.normal_(0, 0.2)
    return holder.lm_head


def test_peft_wrapped_student_head_goes_through_autograd_in_row_chunks():
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher, hidden, teacher_hidden = _models(seed=4, vocab=20_011)
    head = _lora_student(student)
    assert type(head) is not torch.nn.Linear
    trained = [p for p in head.parameters() if p.requires_grad]
    assert len(trained) == 2 and not student.weight.requires_grad  # LoRA's A and B
    heads = OutputHead(head, 0.9, 30.0), OutputHead(teacher)
    # chunk 800: 64 × 800 elements a chunk of rows, two rows of the 20,011 logits at a time
    divergence, entropy = generalized_jsd(
        hidden, heads[0], teacher_hidden, heads[1], 0.5, 0.7, chunk=800
    )
    ours_grads = _grads(divergence.mean(), hidden, *trained)
    exact_head = copy.deepcopy(head).double()  # the exact reference: float64 full logits
    exact_hidden = hidden.detach().double().requires_grad_(True)
    expected = GKDTrainer.generalized_jsd_loss(  # [N, V]: "batchmean" is the mean over N
        _logits(exact_head, exact_hidden, 0.9, 30.0),
        copy.deepcopy(teacher).double()(teacher_hidden.double()),
        beta=0.5,
        temperature=0.7,
    )
    _close(divergence.mean().detach(), expected.detach().float())
    exact = [exact_hidden, *(p for p in exact_head.parameters() if p.requires_grad)]
    # float32 autograd through the LoRA head, two rows at a time, against float64: a gradient
    # entry's rounding reaches 2.4e-5 of the largest for some draws (5e-5 leaves room; a wrong
    # term is off by far more, as the plain head's tests at 1e-5 show)
    for got, want in zip(ours_grads, _grads(expected, *exact), strict=True):
        _close(got, want.float(), tolerance=5e-5)
    full = torch.log_softmax(heads[0].logits(hidden, 0.7), -1)
    _close(entropy, -(full.exp() * full).sum(-1).detach())


class _Wrapped(torch.nn.Module):
    """A head that is not a plain ``nn.Linear`` (as a quantised teacher head would be)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden):
        return self.linear(hidden)


def test_wrapped_teacher_head_with_linear_student_accumulates_over_row_chunks():
    student, teacher, hidden, teacher_hidden = _models(seed=5, vocab=50_021)
    wrt = (hidden, student.weight, student.bias)
    results = []
    for teacher_module in (teacher, _Wrapped(teacher)):
        divergence, entropy = generalized_jsd(
            hidden,
            OutputHead(student),
            teacher_hidden,
            OutputHead(teacher_module),
            1.0,
            chunk=3000,  # three rows a chunk when the teacher's head is wrapped
        )
        results.append((divergence.detach(), entropy, *_grads(divergence.sum(), *wrt)))
    for row_chunks, blocks in zip(*results, strict=True):
        _close(row_chunks, blocks)


def test_autocast_runs_the_head_matmuls_in_bfloat16_and_the_rest_in_float32():
    """Under CPU autocast the divergence is that of the bf16 logits the models' own heads would
    make (computed on, in float32): equal to the full-logit one under the same autocast, and
    measurably not the float32 one; the gradients agree with autograd's to bf16 precision."""
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher, hidden, teacher_hidden = _models(seed=6, vocab=20_011)
    heads = OutputHead(student), OutputHead(teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        divergence, _ = generalized_jsd(hidden, heads[0], teacher_hidden, heads[1], 0.5, chunk=4000)
        student_logits, teacher_logits = heads[0].logits(hidden), heads[1].logits(teacher_hidden)
    assert student_logits.dtype == torch.float32  # OutputHead.logits: bf16 matmul, then float
    expected = GKDTrainer.generalized_jsd_loss(
        student_logits[None], teacher_logits[None], beta=0.5, reduction="none"
    ).sum(-1)[0]
    _close(divergence.detach(), expected.detach())
    float32, _ = generalized_jsd(hidden, heads[0], teacher_hidden, heads[1], 0.5)
    assert (float32 - divergence).abs().max() > 1e-4
    wrt = (hidden, student.weight, student.bias)
    for got, want in zip(_grads(divergence.sum(), *wrt), _grads(expected.sum(), *wrt), strict=True):
        _close(got, want, 2e-2)


def test_frozen_student_head_gets_no_gradient_and_empty_input_runs():
    student, teacher, hidden, teacher_hidden = _models(seed=7, vocab=1_000)
    student.requires_grad_(False)
    heads = OutputHead(student), OutputHead(teacher)
    divergence, _ = generalized_jsd(hidden, heads[0], teacher_hidden, heads[1], 0.5)
    divergence.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert student.weight.grad is None

    empty_hidden = hidden.detach()[:0].requires_grad_(True)
    divergence, entropy = generalized_jsd(empty_hidden, heads[0], teacher_hidden[:0], heads[1], 0)
    assert divergence.shape == entropy.shape == (0,)
    divergence.sum().backward()
    assert empty_hidden.grad is not None and empty_hidden.grad.shape == (0, STUDENT_WIDTH)


def test_bad_inputs_are_refused_with_what_is_wrong():
    student, teacher, hidden, teacher_hidden = _models(seed=8, vocab=1_000)
    heads = OutputHead(student), OutputHead(teacher)
    other = OutputHead(torch.nn.Linear(TEACHER_WIDTH, 1_001))
    with pytest.raises(ValueError, match="1000 output tokens, the teacher's 1001"):
        generalized_jsd(hidden, heads[0], teacher_hidden, other, 0.5)
    with pytest.raises(ValueError, match="logits a position"):  # found on the first block
        generalized_jsd(hidden, heads[0], teacher_hidden, OutputHead(_Wrapped(other.module)), 0.5)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\], got 1.5"):
        generalized_jsd(hidden, heads[0], teacher_hidden, heads[1], 1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generalized_jsd(hidden, heads[0], teacher_hidden, heads[1], 0.5, temperature=0)
    with pytest.raises(ValueError, match="64 positions, teacher_hidden 63"):
        generalized_jsd(hidden, heads[0], teacher_hidden[:63], heads[1], 0.5)
    with pytest.raises(ValueError, match=r"teacher_hidden must be \[positions, hidden size\]"):
        generalized_jsd(hidden, heads[0], teacher_hidden[None], heads[1], 0.5)


def test_teacher_parameters_and_hidden_get_no_gradient():
    student, teacher, hidden, teacher_hidden = _models(seed=9, vocab=1_000)
    teacher.requires_grad_(True)
    teacher_hidden = teacher_hidden.clone().requires_grad_(True)
    heads = OutputHead(student), OutputHead(teacher)
    divergence, _ = generalized_jsd(hidden, heads[0], teacher_hidden, heads[1], 0.5)
    divergence.sum().backward()
    assert teacher.weight.grad is None and teacher_hidden.grad is None
    assert student.weight.grad is not None


def _full_divergence(student_logits, teacher_logits, beta: float, temperature: float):
    """The divergence per position from the full logits, by hand (TRL's convention; what the
    tests above check against TRL), without TRL: the GPU machine's image has none."""
    log_q = torch.log_softmax(student_logits / temperature, -1)
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (
        log_q.exp() * (log_q - log_m)
    ).sum(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_cuda_float32_and_bf16_autocast(beta):
    """On a GPU: float32 equal to the exact (float64) full-logit value to 1e-5; under bf16
    autocast (the backward's matmuls then accumulate in float32 through ``out_dtype``) equal to
    the full logits' autograd under the same autocast to bf16 precision."""
    student, teacher, hidden, teacher_hidden = _models(seed=10)
    student, teacher = student.cuda(), teacher.cuda()
    hidden = hidden.detach().cuda().requires_grad_(True)
    teacher_hidden = teacher_hidden.cuda()
    heads = OutputHead(student, 0.9, 30.0), OutputHead(teacher)
    wrt = (hidden, student.weight, student.bias)
    exact_student, exact_teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    exact_hidden = hidden.detach().double().requires_grad_(True)
    expected = _full_divergence(
        _logits(exact_student, exact_hidden, 0.9, 30.0),
        exact_teacher(teacher_hidden.double()),
        beta,
        0.7,
    ).mean()
    divergence, _ = generalized_jsd(
        hidden, heads[0], teacher_hidden, heads[1], beta, 0.7, chunk=4096
    )
    _close(divergence.mean().detach(), expected.detach().float())
    exact = (exact_hidden, exact_student.weight, exact_student.bias)
    for got, want in zip(_grads(divergence.mean(), *wrt), _grads(expected, *exact), strict=True):
        _close(got, want.float())

    with torch.autocast("cuda", dtype=torch.bfloat16):
        divergence, _ = generalized_jsd(
            hidden, heads[0], teacher_hidden, heads[1], beta, 0.7, chunk=4096
        )
        reference = _full_divergence(
            heads[0].logits(hidden), heads[1].logits(teacher_hidden), beta, 0.7
        ).mean()
    _close(divergence.mean().detach(), reference.detach(), 1e-3)
    for got, want in zip(_grads(divergence.mean(), *wrt), _grads(reference, *wrt), strict=True):
        _close(got, want, 2e-2)
