"""The embedded default: a tiny Llama and a demo task, so ``align run`` works out of the box.

The task is two-number addition in chat form ("What is 7 + 12?" → "7 + 12 = 19."): the loss
falls clearly within a minute on two CPU cores, and a wrong sum makes a natural rejected answer
for preference data. The model and its byte-level BPE tokenizer are built offline from a config,
seeded, saved, and then loaded through the same ``from_pretrained`` path as a user's model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..cache import CACHE_ENV, cache_dir  # noqa: F401 (CACHE_ENV is re-exported)

DEMO_DIR = Path(__file__).parent
MODEL_VERSION = "tiny-llama-v3"
# ``--model NAME``: the demo model, and a smaller one of the same architecture and tokenizer (a
# distillation student, say): name → (directory in the cache, hidden size, layers).
DEMO_MODELS = {
    "demo": (MODEL_VERSION, 128, 4),
    "demo-small": (f"{MODEL_VERSION}-small", 64, 2),
}

# Used when a run has neither --model nor --data, unless the user set them.
DEMO_SETTINGS = {
    "lr": 3e-3,
    "batch_size": 16,
    "epochs": 4,
    "warmup_steps": 10,
    "lr_scheduler": "cosine",
    "eval_every": 50,
    "max_length": 64,
}

# On-policy objectives (grpo, rloo, online-dpo, distill) on the demo data, over
# DEMO_SETTINGS: short sums sampled for 64 prompts a step (a small batch's advantages are
# mostly noise for this model), a constant step ten times smaller than SFT's, and the eval
# split sampled before training too.
# Start from the SFT demo's model (README): from random weights no sample earns a reward.
ON_POLICY_DEMO_SETTINGS = {
    "lr": 3e-4,
    "batch_size": 64,
    "max_steps": 300,
    "warmup_steps": 0,
    "lr_scheduler": "constant",
    "eval_every": 100,
    "eval_on_start": True,
    "max_completion_length": 16,
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def demo_data(shape: str, split: str) -> Path:
    """The bundled demo file for a data format and split ("train" or "eval")."""
    return DEMO_DIR / f"{shape}_{split}.jsonl"


def demo_model_path(name: str = "demo") -> Path:
    """Build the demo model ``name`` (``DEMO_MODELS``) and its tokenizer once, into the cache,
    and return their directory."""
    version, hidden_size, layers = DEMO_MODELS[name]
    target = cache_dir() / version
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_demo_model(tmp, hidden_size=hidden_size, layers=layers)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corpus() -> list[str]:
    import json

    texts = []
    # The files the tokenizer has always been trained on: demo data added later (ranked) uses
    # the same words, and leaving it out keeps the demo tokenizer, and so the model, unchanged.
    for path in sorted(DEMO_DIR.glob("*.jsonl")):
        if path.name.startswith(("ranked_", "prompt_only_")):
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for value in record.values():
                messages = value if isinstance(value, list) else [{"content": value}]
                texts.extend(str(m.get("content", "")) for m in messages)
    return texts + ["<|system|>\n", "<|user|>\n", "<|assistant|>\n"]


def build_tokenizer():
    """A byte-level BPE trained on the demo corpus in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_demo_model(directory: Path, hidden_size: int = 128, layers: int = 4) -> None:
    """Write a seeded tiny Llama and its tokenizer to ``directory`` (safetensors).

    ``hidden_size`` and ``layers`` make larger variants of it (the benchmarks use one).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
