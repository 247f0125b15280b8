"""The teacher of a distilling objective (``Objective(needs_teacher=True)``, ``--teacher``).

Loaded like a ``--ref-model`` reference (safetensors only, ``--trust-remote-code`` from the
run, frozen, in eval mode), optionally on another device (``--teacher-device``) or in another
precision (``--teacher-precision``). It must share the policy's tokenizer: the divergence
compares the two distributions token by token over one vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..model.head import OutputHead, _vocab_size, output_head, why_not_from_hidden
from ..model.loading import load_causal_lm, saved_sequence_classifier
from ..model.logprobs import forward_hidden

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Teacher:
    """A frozen teacher model, handed to ``align_compute_loss`` as ``teacher``.

    ``model``: the model, in eval mode without gradients, on ``device``; ``path``: where it came
    from. :meth:`hidden` gives its final hidden states at a batch's trained positions and
    ``head`` its output head, both on the policy's device (``policy_device``): when the teacher
    runs elsewhere, the hidden rows are moved there and ``head`` is a frozen copy of its output
    head on that device (one vocabulary × hidden matrix), so the divergence runs beside the
    policy's head. ``autocast`` wraps every teacher forward (the run's mixed precision).
    """

    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def __init__(self, model: Any, path: str, policy_device: Any, setup_seconds: float = 0.0):
        self.model = model.eval().requires_grad_(False)
        self.path = path
        self.device = next(model.parameters()).device
        self.policy_device = torch.device(policy_device)
        self.setup_seconds = setup_seconds
        found = output_head(model)
        if isinstance(found, str):  # load_teacher refuses these; a hand-made Teacher too
            raise ConfigError(f"teacher {path!r}: {found}")
        if self.device != self.policy_device:
            module = copy.deepcopy(found.module).to(self.policy_device).requires_grad_(False)
            found = OutputHead(module, found.scale, found.softcap)
        self.head = found

    @torch.no_grad()
    def hidden(self, batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
        """The teacher's final hidden states ``[N, H_teacher]`` at ``batch``'s trained
        positions, in the order of the policy's (``align.forward_hidden`` on the same batch),
        on the policy's device, without gradients."""
        if self.device != self.policy_device:
            batch = {
                k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }
        with self.autocast():
            rows = forward_hidden(self.model, batch, prefix)
        return rows.to(self.policy_device)


def load_teacher(cfg: Any, tokenizer: Any, policy: Any, policy_device: Any) -> Teacher:
    """``--teacher``: loaded, checked against the policy's tokenizer and output head, frozen
    and moved to ``--teacher-device`` (default: the policy's device)."""
    started = time.time()
    path = cfg.teacher
    classifier = saved_sequence_classifier(path)
    if classifier is not None:  # its causal LM would be its backbone and a head it never had
        raise ConfigError(
            f"--teacher {path!r} is a reward model ({classifier}): it gives one score per "
            "sequence, not a next-token distribution to distil; the teacher is a causal "
            "language model sharing the policy's tokenizer"
        )
    check_same_tokenizer(path, tokenizer, cfg.trust_remote_code)
    dtype = DTYPES[cfg.teacher_precision or "no"]
    model = load_causal_lm(path, cfg.trust_remote_code, role="teacher", dtype=dtype)
    reason = why_not_from_hidden(model, "teacher")
    if reason:
        raise ConfigError(
            f"--teacher {path!r}: {reason}; distillation computes the teacher's distribution "
            "from its hidden states through its output head, which align cannot do for it"
        )
    teacher_vocab = _head_vocab(model)
    policy_vocab = _head_vocab(policy)
    if teacher_vocab != policy_vocab:
        raise ConfigError(
            f"--teacher {path!r}: its output head has {teacher_vocab} tokens and the policy's "
            f"({cfg.model!r}) {policy_vocab}: the divergence compares the two over one "
            "vocabulary, so both models need output heads of the same size"
        )
    try:
        device = torch.device(cfg.teacher_device) if cfg.teacher_device else policy_device
        model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"--teacher-device {cfg.teacher_device}: {exc}") from None
    return Teacher(model, path, policy_device, time.time() - started)


def _head_vocab(model: Any) -> int:
    """The number of tokens the model's output head scores."""
    head = output_head(model)
    module = head.module if isinstance(head, OutputHead) else model.get_output_embeddings()
    return _vocab_size(module)


def check_same_tokenizer(path: str, tokenizer: Any, trust_remote_code: bool) -> None:
    """Refuse a teacher whose tokenizer is not the policy's: another vocabulary (token → id)
    or other special tokens. A teacher directory without a tokenizer is checked by its
    config's ``vocab_size`` against the policy tokenizer's size."""
    from transformers import AutoConfig, AutoTokenizer

    student = getattr(tokenizer, "name_or_path", "") or "the policy's"
    try:
        theirs = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        theirs = None
    if theirs is None:
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load teacher {path!r}: {exc}") from None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None)
        if vocab is not None and vocab < len(tokenizer):
            raise ConfigError(
                f"--teacher {path!r} has no tokenizer and its config's vocab_size is {vocab}, "
                f"fewer than the {len(tokenizer)} tokens of the policy's tokenizer ({student}): "
                "the teacher must share the policy's tokenizer"
            )
        return
    problems = []
    ours, other = tokenizer.get_vocab(), theirs.get_vocab()
    if ours != other:
        differ = sorted(set(ours.items()) ^ set(other.items()), key=lambda item: item[1])
        example = differ[0] if differ else None
        problems.append(
            f"vocabularies differ ({len(other)} tokens against {len(ours)}"
            + (f"; first difference: {example[0]!r} → id {example[1]}" if example else "")
            + ")"
        )
    for name in ("bos_token", "eos_token", "unk_token"):
        if getattr(tokenizer, name, None) != getattr(theirs, name, None):
            problems.append(
                f"{name} {getattr(theirs, name, None)!r} against {getattr(tokenizer, name, None)!r}"
            )
    if problems:
        raise ConfigError(
            f"--teacher {path!r}: its tokenizer ({theirs.name_or_path}) is not the policy's "
            f"({student}): {'; '.join(problems)}. Distillation compares the two models' "
            "distributions token by token, so the teacher must share the student's tokenizer"
        )
