"""Loading causal language models the one safe way: safetensors weights only, float32, remote
code only when the user asked for it; and refusing at once a model that cannot be loaded."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError

HUB_TIMEOUT = 3.0  # seconds to wait for a connection to the hub before calling it unreachable
_PATH_PREFIXES = ("./", "../", "/", "~")


def check_model_source(name: str, role: str = "model", given_by: str | None = None) -> None:
    """Refuse, in at most a few seconds, a model that cannot be loaded: a path that does not
    exist, or a hub id that is not cached while the hub is offline or unreachable (the hub
    client would otherwise spend minutes retrying). Imports neither torch nor transformers.

    A value is a path when it starts with ``./``, ``../``, ``/`` or ``~``, or is not a valid
    hub id. A model in the hub cache while the hub is unreachable switches the process to
    offline mode (``HF_HUB_OFFLINE=1``, which processes it starts inherit): it loads from the
    cache at once instead of after minutes of retries.
    """
    by = f" (given by {given_by})" if given_by else ""
    if name and Path(name).expanduser().exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
        is_hub_id = not name.startswith(_PATH_PREFIXES)
    except HFValidationError:
        is_hub_id = False
    if not is_hub_id:
        raise ConfigError(f"{role} path {name} does not exist{by}")
    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if _offline():
        if cached:
            return
        why = "offline mode is on (HF_HUB_OFFLINE) and the model is not in the hub cache"
    else:
        why = _unreachable(constants.ENDPOINT)
        if why is None:
            return
        if cached:
            _go_offline(f"the model hub is unreachable ({why}): {role} {name} loads from the cache")
            return
        why = f"the model hub is unreachable ({why})"
    first, _, rest = name.partition("/")
    local = f" ({first}/ here has no {rest})" if rest and Path(first).is_dir() else ""
    raise ConfigError(
        f"{role} {name!r}{by} is not a local directory{local} and {why}; check the path or "
        "hub id, or download the model where the hub can be reached"
    )


def _go_offline(notice: str) -> None:
    from huggingface_hub import constants

    from ..console import echo

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    echo(f"{notice} (HF_HUB_OFFLINE=1).")


def _offline() -> bool:
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


@functools.lru_cache(maxsize=4)
def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to ``endpoint`` (or the HTTPS proxy) failed, or None when it worked.

    Name resolution has no timeout of its own, so the attempt runs in a thread."""
    host = urllib.parse.urlsplit(endpoint).hostname or ""
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get("https")
    target = urllib.parse.urlsplit(proxy or endpoint)
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=HUB_TIMEOUT).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{address[0]}:{address[1]}: {exc.strerror or exc}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT)
    return outcome[0] if outcome else f"{address[0]}: no answer within {HUB_TIMEOUT:g} s"


def load_causal_lm(path: str, trust_remote_code: bool, role: str = "model", **extra: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained``; a failure names the ``role`` and the path.

    ``extra`` adds or overrides ``from_pretrained`` arguments (``quantization_config``, …)."""
    return load_pretrained(path, trust_remote_code, "causal_lm", role, **extra)


def load_pretrained(
    path: str, trust_remote_code: bool, model_class: str, role: str = "model", **extra: Any
) -> Any:
    """``from_pretrained`` of the auto class for an objective's ``model_class``: a causal LM, or
    a sequence classifier with one label (a reward model; its ``score`` head, new when ``path``
    holds a causal LM, is initialised by transformers from torch's seed, as TRL's
    ``RewardTrainer`` leaves it). A failure names the ``role`` and the path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = os.path.expanduser(path)
    check_model_source(path, role)
    kwargs = {"use_safetensors": True, "dtype": torch.float32, **extra}
    auto: Any = AutoModelForCausalLM
    quiet: Any = contextlib.nullcontext()
    if model_class == "sequence_classification":
        auto, kwargs = AutoModelForSequenceClassification, {"num_labels": 1, **kwargs}
        quiet = _head_swap_unreported()
        _refuse_other_labels(path, trust_remote_code, role)
    try:
        with quiet:
            model = auto.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {role} {path!r}: {exc}") from None
    if model_class == "sequence_classification":
        check_single_score(model, f"{role} {path!r}")
    return model


def _refuse_other_labels(path: str, trust_remote_code: bool, role: str) -> None:
    """A saved classifier with another number of labels cannot load as a one-label one (its
    head's shape differs: transformers raises a bare RuntimeError): said with its path."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return  # from_pretrained says why
    names = [str(a) for a in getattr(config, "architectures", None) or []]
    labels = config.num_labels
    if any(a.endswith("ForSequenceClassification") for a in names) and labels != 1:
        raise ConfigError(
            f"{role} {path!r} is a sequence classifier with num_labels={labels}; a reward model "
            "gives one score per sequence (num_labels=1): start from its language model or a "
            "one-label classifier"
        )


@contextlib.contextmanager
def _head_swap_unreported() -> Iterator[None]:
    """Loading a causal LM as a sequence classifier leaves ``score.weight`` new and
    ``lm_head`` unused, as intended: transformers' load report of the two is left out, as TRL's
    ``RewardTrainer`` leaves it out (the run's log says the head is new instead)."""
    from transformers.modeling_layers import GenericForSequenceClassification as generic

    saved = {
        name: getattr(generic, name, None)
        for name in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected")
    }
    generic._keys_to_ignore_on_load_missing = [
        *(saved["_keys_to_ignore_on_load_missing"] or []),
        r"^score\.weight$",
    ]
    generic._keys_to_ignore_on_load_unexpected = [
        *(saved["_keys_to_ignore_on_load_unexpected"] or []),
        r"^lm_head\.",
    ]
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(generic, name, value)


def is_sequence_classifier(model: Any) -> bool:
    """Whether ``model`` (a PEFT wrapper's base included) is a sequence classifier."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForSequenceClassification")


def check_single_score(model: Any, named: str) -> None:
    """Refuse a sequence classifier that is not a reward model: one score per sequence."""
    labels = getattr(model.config, "num_labels", None)
    if labels != 1:
        raise ConfigError(
            f"{named} has num_labels={labels}; a reward model gives one score per sequence "
            "(num_labels=1)"
        )


def set_pad_token_id(model: Any, pad_token_id: int) -> None:
    """Give a sequence classifier the pad token by which it finds each sequence's last token:
    on its config, and on its text config where that is another (a multimodal model's)."""
    model.config.pad_token_id = pad_token_id
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.pad_token_id = pad_token_id


def saved_sequence_classifier(directory: Any) -> str | None:
    """The architecture of a saved model or LoRA adapter directory when it is a sequence
    classifier (a reward model, which scores text and cannot generate), else None (also for
    a path that is no such directory, a hub id say)."""
    folder = Path(directory)
    try:
        if (folder / "adapter_config.json").is_file():
            adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            seq_cls = adapter.get("task_type") == "SEQ_CLS"
            return "a LoRA adapter of task type SEQ_CLS" if seq_cls else None
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    names = config.get("architectures") or []
    found = [a for a in names if isinstance(a, str) and a.endswith("ForSequenceClassification")]
    return found[0] if found else None


PACKED_ATTENTION_ENV = "ALIGN_PACKED_ATTENTION"  # forces the packed runs' attention ("sdpa", …)


def packed_attention_implementation(device: Any, shared_prompts: bool) -> str:
    """The attention implementation a run that packs its batches should load its models with.

    On CUDA, a kernel that builds no dense ``T × T`` mask (``align.model.attention``): flash
    attention's variable lengths for plain packing (no sequence shares a prompt) when a flash
    package is installed (FA3 first: Hopper), else FlexAttention's block mask, which also
    expresses shared prompts. Elsewhere ``sdpa`` with the dense mask: FlexAttention's backward
    and flash attention run on CUDA only. ``$ALIGN_PACKED_ATTENTION`` overrides the choice
    (``sdpa``: the dense path, to compare against).
    """
    forced = os.environ.get(PACKED_ATTENTION_ENV, "").strip()
    if forced and forced != "auto":
        return forced
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return "sdpa"
    if not shared_prompts:
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        if is_flash_attn_3_available():
            return "flash_attention_3"
        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "flex_attention"


def switch_attention(model: Any, implementation: str) -> str | None:
    """Switch a loaded model's attention to ``implementation`` (transformers'
    ``set_attn_implementation``, which checks the model and the installed kernels); None when
    it now runs it, else why not (the model keeps its attention)."""
    if getattr(model.config, "_attn_implementation", None) == implementation:
        return None
    try:
        model.set_attn_implementation(implementation)
    except (ImportError, ValueError, AttributeError) as exc:
        return f"the model cannot run {implementation} attention ({exc})"
    current = getattr(model.config, "_attn_implementation", None)
    if current != implementation:
        return f"the model cannot run {implementation} attention (it runs {current})"
    return None
