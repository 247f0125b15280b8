"""Reference log-probs for objectives that declare ``needs_reference``.

A loss hook receives a ``Reference`` and calls ``reference.sequence_logps(batch, prefix)``: the
reference model's ``logp(y|x)`` for every row of ``batch[prefix + "input_ids"]``, summed over
completion tokens with the same masking as the policy's, without gradients and with dropout
off. An on-policy objective passes ``temperature=run.config.temperature`` to it (and to
``token_logps``) as it does to ``align.forward_logps`` for the policy, so both are scored on the
distribution the completions were sampled from. The same call works in every mode
(``--reference``):

- ``precomputed`` (the default): one no-grad pass over the data before training, cached on disk
  (``align.precompute``); no reference model is held during training and a step costs no
  reference forward.
- ``model``: a frozen copy of the starting model (or ``--ref-model``), run for every batch.
- ``adapter``: the policy itself with its PEFT (LoRA) adapter disabled; no second model.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..model.dropout import eval_mode
from ..model.head import why_not_from_hidden
from ..model.loading import load_causal_lm
from ..model.logprobs import forward_logps

REFERENCE_MODES = ("precomputed", "model", "adapter")
REFERENCE_ADAPTER = "reference"  # a frozen starting adapter, used in place of no adapter


class Reference:
    """Per-sequence reference log-probs, summed over completion tokens like the policy's.

    ``autocast`` wraps every reference forward: the run sets it to the accelerator's, so the
    reference runs in the mixed precision the policy trains in.
    """

    mode: str = ""
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def sequence_logps(
        self, batch: dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0
    ) -> torch.Tensor:
        """``logp_ref(y|x)`` for every row of ``batch`` (keys optionally prefixed), float32:
        the sum over completion tokens of the log-probs of ``logits / temperature``, as
        ``align.forward_logps(model, batch, prefix, temperature).sums`` scores the policy.

        ``temperature`` (default 1, the model's own distribution; 0 is greedy sampling and
        scores as 1): an on-policy objective scores the policy and the reference alike at
        ``run.config.temperature``, the distribution its completions were sampled from, so
        that the KL to the reference is exactly 0 at step 0 whatever the temperature. The
        ``model`` and ``adapter`` modes score any temperature; a precomputed reference holds
        sums at temperature 1 only and refuses another (on-policy objectives never use it:
        their completions do not exist before training)."""
        raise NotImplementedError

    def token_logps(
        self, batch: dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0
    ) -> torch.Tensor:
        """Per-token reference log-probs in the batch's layout, the shape of
        ``align.forward_logps(model, batch, prefix, temperature).logps`` (0 where no completion
        token is predicted): for per-token penalties such as GRPO's KL. ``temperature`` as for
        :meth:`sequence_logps` (an on-policy objective passes ``run.config.temperature``). The
        ``model`` and ``adapter`` modes give them; a precomputed reference holds sums only."""
        raise NotImplementedError(
            f"the {self.mode or 'precomputed'} reference gives per-sequence sums only; use "
            "--reference model or adapter"
        )


class ModelReference(Reference):
    """A separate frozen model: the starting model's copy, or ``--ref-model``."""

    mode = "model"

    def __init__(self, model: Any, setup_seconds: float = 0.0) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.setup_seconds = setup_seconds  # what making it cost, for the run's record

    @classmethod
    def frozen_copy(cls, model: Any) -> ModelReference:
        started = time.time()
        return cls(copy.deepcopy(model), time.time() - started)

    @torch.no_grad()
    def sequence_logps(
        self, batch: dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0
    ) -> torch.Tensor:
        with self.autocast():
            return forward_logps(self.model, batch, prefix, temperature).sums

    @torch.no_grad()
    def token_logps(
        self, batch: dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0
    ) -> torch.Tensor:
        with self.autocast():
            return forward_logps(self.model, batch, prefix, temperature).logps


class AdapterReference(Reference):
    """The policy with its trainable adapter switched off: no second model in memory.

    When the policy also holds a frozen adapter named ``reference`` (a run that starts from an
    existing adapter loads it twice), that adapter is switched on instead, so the reference is
    the starting point, not the bare base model.
    """

    mode = "adapter"

    def __init__(self, policy: Any) -> None:
        if not has_adapter(policy):
            raise ConfigError(
                "--reference adapter needs a policy with a PEFT (LoRA) adapter, and this model "
                "has none; add one with a model-preparation plugin (--lora), or use "
                "--reference precomputed or model"
            )
        self.policy = policy
        self.has_reference_adapter = REFERENCE_ADAPTER in getattr(policy, "peft_config", {})

    @contextlib.contextmanager
    def _reference_weights(self):
        if not self.has_reference_adapter:
            with self.policy.disable_adapter():
                yield
            return
        trained = self.policy.active_adapter
        self.policy.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            self.policy.set_adapter(trained)

    @torch.no_grad()
    def sequence_logps(
        self, batch: dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0
    ) -> torch.Tensor:
        with eval_mode(self.policy), self._reference_weights(), self.autocast():
            return forward_logps(self.policy, batch, prefix, temperature).sums

    @torch.no_grad()
    def token_logps(
        self, batch: dict[str, torch.Tensor], prefix: str = "", temperature: float = 1.0
    ) -> torch.Tensor:
        with eval_mode(self.policy), self._reference_weights(), self.autocast():
            return forward_logps(self.policy, batch, prefix, temperature).logps


def has_adapter(model: Any) -> bool:
    """Whether a model-preparation plugin gave the policy a PEFT adapter."""
    return callable(getattr(model, "disable_adapter", None))


def load_reference_model(path: str, tokenizer: Any, trust_remote_code: bool) -> Any:
    """``--ref-model``: loaded like the policy (safetensors only), checked against the tokenizer."""
    model = load_causal_lm(path, trust_remote_code, role="reference model")
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"reference model {path!r} has {vocab} token embeddings but the policy's tokenizer "
            f"has {len(tokenizer)} tokens: the reference must share the policy's tokenizer"
        )
    model = model.eval().requires_grad_(False)
    why_not_from_hidden(model, "reference model")  # remembered: forward_logps reads it
    return model
