"""Rounds of rollouts for an on-policy objective: prompts in, scored rollout batches out.

A round samples ``num_generations`` completions for every prompt of the step's micro-batches
(one backend call per micro-batch, each seeded from the run's seed, the round and the process,
so a resumed run samples what the uninterrupted one would have), decodes them, scores them
with the run's rewards, lays them out (:mod:`.batch`) and lets the objective's
``align_prepare_rollouts`` finish them (GRPO's advantages). The round's metrics are TRL's:
``reward``, ``reward_std``, ``rewards/<name>/mean`` and ``/std``, ``completions/mean_length``,
``min_length``, ``max_length``, ``clipped_ratio``, ``mean_terminated_length``,
``min_terminated_length`` and ``max_terminated_length`` (those of the completions that ended
in EOS; 0 when none did, as TRL), and for a training round ``num_tokens``, its prompts' and
completions' tokens (a prompt once per completion).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ..data.batching import count_sequence_tokens
from ..errors import PluginError
from ..plugins.api import GenerationRequest
from .batch import add_fields, add_rewards, rollout_batch
from .generate import eos_token_ids, round_seed, sampling_context
from .mixed import sampling_prompt
from .rewards import RewardSet


class RolloutEngine:
    """Samples and scores rounds of rollouts for the run's on-policy objective."""

    def __init__(self, spec: Any, registry: Any, hooks: Any, tokenizer: Any, model: Any) -> None:
        self.cfg, self.hooks, self.tokenizer = spec.config, hooks, tokenizer
        self.sampling = spec.objective.item.sampling(spec.options)
        self.generator = registry.generators[self.cfg.generator]
        self.rewards = {
            split: RewardSet(spec.rewards, self.cfg, spec.given.named(path))
            for split, path in (("train", self.cfg.data), ("eval", self.cfg.eval_data))
        }
        self.eos = eos_token_ids(model, tokenizer)
        if not self.eos:
            raise PluginError("on-policy objectives need a tokenizer with an EOS token")

    @property
    def num_generations(self) -> int:
        return self.sampling.num_generations

    def round(
        self,
        model: Any,
        micro_batches: list[list[dict[str, Any]]],
        round_index: int,
        split: str,
        accelerator: Any,
        reference: Any,
        run: Any,
        metrics: Any,
        sampler: Any = None,
    ) -> list[dict[str, Any]]:
        """Sample, score and lay out every micro-batch of prompts; the objective's
        ``align_prepare_rollouts`` then sees them all (with ``model``, the policy). Round
        metrics go into ``metrics``. ``sampler``: the model that samples, when not the policy
        (the teacher, for ``Sampling(teacher_samples=True)``)."""
        self.rewards[split].load_models(accelerator)  # reward models: at the first round
        batches = []
        for position, examples in enumerate(micro_batches):
            seed = round_seed(
                self.cfg.seed,
                round_index * len(micro_batches) + position,
                accelerator.process_index,
                split,
            )
            batch = self._micro_batch(sampler or model, examples, seed, split, accelerator)
            batch["on_policy"] = sampler is None
            batches.append(batch)
        self._round_metrics(batches, metrics, accelerator, by_completions=split != "train")
        if split == "train":  # TRL's num_tokens: each round's prompts and completions, once
            metrics.add("num_tokens", sum(count_sequence_tokens(b) for b in batches), 1)
        return self.hooks.prepare_rollouts(model, batches, reference, run)

    def _micro_batch(
        self, model: Any, examples: list[dict[str, Any]], seed: int, split: str, accelerator: Any
    ) -> dict[str, Any]:
        cfg, g = self.cfg, self.num_generations
        generator = self.generator.item
        with sampling_context(model, accelerator, seed) as policy:
            request = GenerationRequest(
                model=policy,
                tokenizer=self.tokenizer,
                prompts=[sampling_prompt(e) for e in examples],
                num_generations=g,
                max_new_tokens=cfg.max_completion_length,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                min_p=cfg.min_p,
                repetition_penalty=cfg.repetition_penalty,
                eos_token_ids=list(self.eos),
                pad_token_id=self.tokenizer.pad_token_id,
                seed=seed,
            )
            completions = [list(map(int, c)) for c in generator.generate(request)]
        label = f"generator {generator.name!r} ({self.generator.plugin.label})"
        if len(completions) != len(examples) * g:
            raise PluginError(
                f"{label} returned {len(completions)} completions for {len(examples)} prompts × "
                f"{g} generations"
            )
        eos = set(self.eos)
        for ids in completions:
            if not ids or len(ids) > cfg.max_completion_length:
                raise PluginError(
                    f"{label} returned a completion of {len(ids)} tokens: each needs 1 to "
                    f"max_completion_length ({cfg.max_completion_length})"
                )
        truncated = [ids[-1] not in eos for ids in completions]
        batch = rollout_batch(
            examples,
            completions,
            g,
            self.tokenizer.pad_token_id,
            self.hooks.packed,
            truncated,
        )
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        prompts = [e.get("prompt") for e in examples for _ in range(g)]
        decoded = [
            [{"role": "assistant", "content": t}] if isinstance(p, list) else t
            for t, p in zip(texts, prompts, strict=True)
        ]
        rewards = self.rewards[split]
        fields = {
            name: [e[name] for e in examples for _ in range(g)] for name in rewards.field_names()
        }
        records = [str(e.get("record", f"example {e.get('index')}")) for e in examples]
        values = []
        if rewards.names:  # an objective without rewards (distill) may have none
            values = rewards.score(
                prompts, decoded, completions, fields, [r for r in records for _ in range(g)]
            )
        add_rewards(batch, rewards.names, rewards.weights, values)
        add_fields(batch, examples, self.hooks.field_names)
        batch["completions"], batch["prompts"] = decoded, prompts
        from accelerate.utils import send_to_device

        return send_to_device(batch, accelerator.device)

    def _round_metrics(
        self,
        batches: list[dict[str, Any]],
        metrics: Any,
        accelerator: Any,
        by_completions: bool = False,
    ) -> None:
        """TRL's generation metrics, over the whole round and every process."""
        from accelerate.utils import gather_object

        names = self.rewards["train"].names
        local = {
            "rewards": [v for b in batches if names for v in b["rewards"].tolist()],
            "lengths": [v for b in batches for v in b["completion_lengths"].tolist()],
            "truncated": [v for b in batches for v in b["truncated"].tolist()],
            **{n: [v for b in batches for v in b[f"rewards/{n}"].tolist()] for n in names},
        }
        if accelerator.num_processes > 1:
            gathered = gather_object([local])
            local = {k: [v for part in gathered for v in part[k]] for k in local}
        rewards, lengths = local["rewards"], local["lengths"]
        terminated = [n for n, t in zip(lengths, local["truncated"], strict=True) if not t]
        values = (
            {} if not names else {"reward": statistics.fmean(rewards), "reward_std": _std(rewards)}
        )
        values |= {
            "completions/mean_length": statistics.fmean(lengths),
            "completions/min_length": float(min(lengths)),
            "completions/max_length": float(max(lengths)),
            "completions/clipped_ratio": sum(local["truncated"]) / len(lengths),
            "completions/mean_terminated_length": (
                statistics.fmean(terminated) if terminated else 0.0
            ),
            "completions/min_terminated_length": float(min(terminated, default=0)),
            "completions/max_terminated_length": float(max(terminated, default=0)),
        }
        for name in names:
            values[f"rewards/{name}/mean"] = statistics.fmean(local[name])
            values[f"rewards/{name}/std"] = _std(local[name])
        # Every process adds the same value. A training round (one a step) counts once, so a
        # row is TRL's mean over its steps; an evaluation's rounds (its micro-batches, the last
        # one smaller) count by their completions, so eval_reward is the mean over every
        # held-out completion, not a mean of batch means. ``lengths`` were gathered above: the
        # same count on every process, with or without rewards.
        count = len(lengths) if by_completions else 1
        for name, value in values.items():
            metrics.add(name, torch.tensor(value * count, dtype=torch.float64), count)


def _std(values: list[float]) -> float:
    """The unbiased standard deviation (TRL's ``nanstd``), 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0
