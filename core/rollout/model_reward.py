"""Rewards from a model: ``--reward model:PATH[=WEIGHT]`` scores each completion with a
sequence-classification reward model, as TRL's ``GRPOTrainer._calculate_rewards`` scores with a
``PreTrainedModel`` among its ``reward_funcs``.

Each prompt and its completion are rendered with the reward model's own tokenizer: chat
messages (``prompt + [assistant completion]``) through its chat template, plain text as
``prompt + completion``; tokenized without special tokens (the template or the text carries
them), padded on the right, and scored by ``logits[:, 0]`` in eval mode, without gradients,
under the run's autocast, on the policy's device (every process scores its own completions), in
batches of ``batch_size`` texts of similar lengths (the least padding). A text longer than the
reward model's positions keeps its last ones (the completion, whose last token the head reads)
and is counted in the run's log: TRL would pass it whole.

Checked when the run is resolved, before torch loads anything: PATH is a directory with a
``config.json`` of a ``…ForSequenceClassification`` architecture with one label, safetensors
weights and a tokenizer. The model loads once per run, at the first round.

The reward is named after the directory (``rewards/<name>/mean``), or, for an align run's
``RUN/final`` and ``RUN/checkpoints/step-N``, after the run: ``rm`` and ``rm-step-N``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from ..console import RUN_LOGGER
from ..errors import ConfigError, PluginError
from ..plugins.api import Options, Reward

MODEL_PREFIX = "model:"
LABEL = "reward model"  # how errors name the provider: reward 'rm' (reward model runs/rm/final)
NAME_RULE = "a reward model is named after its directory, or its run's for RUN/final"
_SENTINEL_LENGTH = 1_000_000  # a tokenizer's model_max_length above this means "no limit"


class ModelRewardOptions(Options):
    batch_size: int = Field(
        32,
        ge=1,
        description="Completions scored per forward pass of the reward model (the values do not "
        "depend on it; memory does).",
    )


def is_model_reward(item: str) -> bool:
    """Whether ``--reward ITEM`` names a reward model (``model:PATH[=WEIGHT]``)."""
    return item.strip().startswith(MODEL_PREFIX)


def split_model_reward(item: str) -> tuple[str, str | None]:
    """``model:PATH[=WEIGHT]`` → ``(PATH, WEIGHT text or None)``. The weight follows the last
    ``=``, unless ``PATH=…`` as a whole is a directory (a path may hold ``=``)."""
    text = item.strip()[len(MODEL_PREFIX) :].strip()
    path, sep, weight = text.rpartition("=")
    if not sep or Path(text).expanduser().is_dir():
        return text, None
    return path.strip(), weight


def reward_name(path: str) -> str:
    """The reward's name (``rewards/<name>/mean``): the directory's name; for an align run's
    ``RUN/final`` the run's (``rm``), for ``RUN/checkpoints/step-N`` ``RUN-step-N``."""
    resolved = Path(path).expanduser().resolve()
    if resolved.name == "final" and resolved.parent.name:
        return resolved.parent.name
    if resolved.parent.name == "checkpoints" and resolved.parent.parent.name:
        return f"{resolved.parent.parent.name}-{resolved.name}"
    return resolved.name


def model_reward(path: str, source: str) -> Reward:
    """The :class:`Reward` of the reward model at ``path``, checked without torch; errors name
    ``source`` (``--reward``, ``rewards (run.yaml)``)."""
    where = f"{source}: reward model {path}"
    directory = Path(path).expanduser()
    if not path:
        raise ConfigError(f"{source}: {MODEL_PREFIX} needs a directory: --reward model:PATH")
    if not directory.exists():
        raise ConfigError(f"{where}: no such directory")
    if not directory.is_dir():
        raise ConfigError(f"{where}: not a directory (give the model's directory)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{where}: no config.json: {_why_no_config(directory, path)}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read config.json: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json is not a JSON object")
    architectures = config.get("architectures") or []
    if architectures and not any(
        str(a).endswith("ForSequenceClassification") for a in architectures
    ):
        raise ConfigError(
            f"{where}: config.json's architecture is {', '.join(map(str, architectures))}, not a "
            "sequence-classification model with a score head (…ForSequenceClassification, as "
            "the reward-model objective or TRL's RewardTrainer saves one)"
        )
    labels = _num_labels(config)
    if labels != 1:
        raise ConfigError(
            f"{where}: config.json gives {labels} labels; a reward model has one "
            "(num_labels=1): its single logit is the reward"
        )
    if not any(directory.glob("*.safetensors")):
        raise ConfigError(
            f"{where}: no .safetensors weights (align loads weights only from safetensors; "
            "save the model with safe_serialization=True)"
        )
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(
            f"{where}: no tokenizer (tokenizer.json or tokenizer_config.json): the reward model "
            "reads the completions with its own tokenizer; save it next to the model"
        )
    name = reward_name(path)
    description = f"reward model {path}: its score of the prompt and completion"
    return Reward(name, description, ModelReward(path, name), options=ModelRewardOptions)


def _why_no_config(directory: Path, path: str) -> str:
    """What a directory without config.json is: a reward model's LoRA adapter (PEFT's task type
    ``SEQ_CLS``, which ``align merge`` makes a whole reward model of), another adapter (a
    language model's, which merging leaves a language model), or no model at all."""
    try:
        adapter = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "not a model directory"
    task = adapter.get("task_type") if isinstance(adapter, dict) else None
    if task == "SEQ_CLS":
        return (
            "a reward model's LoRA adapter (task type SEQ_CLS), without its base model: merge "
            f"it into a whole model, align merge {path} --output DIR, and give "
            f"{MODEL_PREFIX}DIR"
        )
    return (
        f"a LoRA adapter of task type {task}, not a reward model's (SEQ_CLS): merged, it "
        "would be no sequence classifier either; train a reward model with --objective "
        "reward-model"
    )


def _num_labels(config: dict[str, Any]) -> int:
    """``PretrainedConfig.num_labels`` from a config.json: its ``id2label``'s size, else
    ``num_labels``, else transformers' default of 2."""
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    if isinstance(config.get("num_labels"), int):
        return config["num_labels"]
    return 2


class ModelReward:
    """A reward model as a reward function: loaded by :meth:`load` (once per run, on the
    policy's device), then called like any reward with the prompts and completions."""

    def __init__(self, path: str, name: str) -> None:
        self.path, self.name = path, name
        self.model: Any = None
        self.tokenizer: Any = None
        self.autocast: Any = None
        self.max_length: int | None = None
        self.load_seconds = 0.0
        self.truncated_before = False  # said once on the console; later cuts go to train.log

    def __repr__(self) -> str:
        return f"ModelReward({self.path!r})"

    @property
    def label(self) -> str:
        return f"{LABEL} {self.path}"

    def load(self, config: Any, accelerator: Any) -> None:
        """Load the model and tokenizer onto ``accelerator.device`` (safetensors only, float32
        as the policy, remote code only with the run's ``trust_remote_code``), frozen."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        started = time.perf_counter()
        path, trust = str(Path(self.path).expanduser()), config.trust_remote_code
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                trust_remote_code=trust,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load {self.label}: {exc}") from None
        if info.get("missing_keys"):
            missing = ", ".join(sorted(info["missing_keys"])[:3])
            raise ConfigError(
                f"{self.label}: its weights lack {missing}: a causal LM or a model without a "
                "trained score head would give random rewards"
            )
        if model.config.num_labels != 1:
            labels = model.config.num_labels
            raise ConfigError(f"{self.label}: {labels} labels; a reward model has one")
        if tokenizer.pad_token_id is None:  # as TRL: pad with EOS
            if tokenizer.eos_token is None:
                raise ConfigError(f"{self.label}: its tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        # The head reads the last token that is not padding: it must know the padding id (TRL).
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        self.max_length = _max_length(model.config, tokenizer)
        self.model = model.to(accelerator.device).eval().requires_grad_(False)
        self.tokenizer, self.autocast = tokenizer, accelerator.autocast
        self.load_seconds = time.perf_counter() - started
        logging.getLogger(RUN_LOGGER).debug(
            f"reward {self.name!r}: {self.label} loaded in {self.load_seconds:.2f}s on "
            f"{accelerator.device} ({type(model).__name__}, at most {self.max_length} tokens)"
        )

    def texts(self, prompts: list[Any], completions: list[Any]) -> list[str]:
        """Each prompt and completion as the reward model reads them (TRL's rendering)."""
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, list):
                if self.tokenizer.chat_template is None:
                    raise PluginError(
                        f"{self.label}: the prompts are chat messages and the reward model's "
                        "tokenizer has no chat template; save one with the tokenizer "
                        "(tokenizer.chat_template), or give plain-text prompts"
                    )
                texts.append(
                    self.tokenizer.apply_chat_template(prompt + completion, tokenize=False)
                )
            else:
                texts.append(prompt + completion)
        return texts

    def __call__(self, prompts: list[Any], completions: list[Any], options: Any) -> list[float]:
        import torch

        if self.model is None:
            raise PluginError(f"{self.label} was not loaded (RewardSet.load_models)")
        started = time.perf_counter()
        texts = self.texts(prompts, completions)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        cut = [len(x) for x in ids if len(x) > self.max_length]
        if cut:
            ids = [x[-self.max_length :] for x in ids]
            self._report_cut(cut, len(ids))
        scores = [0.0] * len(ids)
        device = next(self.model.parameters()).device
        # Batches of similar lengths pad least; each text's score lands in its own place.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), options.batch_size):
            chunk = order[start : start + options.batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [ids[i] for i in chunk]},
                padding=True,
                padding_side="right",
                return_tensors="pt",
            ).to(device)
            with torch.inference_mode(), self.autocast():
                logits = self.model(**batch).logits
            for i, score in zip(chunk, logits[:, 0].float().tolist(), strict=True):
                scores[i] = score
        logging.getLogger(RUN_LOGGER).debug(
            f"reward {self.name!r}: {len(texts)} completions scored in "
            f"{time.perf_counter() - started:.3f}s"
        )
        return scores

    def _report_cut(self, lengths: list[int], count: int) -> None:
        message = (
            f"reward {self.name!r}: {len(lengths)} of {count} prompt+completion texts are longer "
            f"than the reward model's {self.max_length} tokens (up to {max(lengths)}); each was "
            f"scored on its last {self.max_length} tokens"
        )
        if self.truncated_before:
            logging.getLogger(RUN_LOGGER).debug(message)
        else:
            self.truncated_before = True
            logging.getLogger(RUN_LOGGER).info(f"{message} (later rounds: in train.log)")


def _max_length(config: Any, tokenizer: Any) -> int:
    """The most tokens the reward model reads: its positions, or its tokenizer's
    ``model_max_length`` when that is smaller (and not transformers' "no limit")."""
    limits = [getattr(config.get_text_config(), "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    known = [int(x) for x in limits if isinstance(x, int) and 0 < x < _SENTINEL_LENGTH]
    return min(known) if known else _SENTINEL_LENGTH
