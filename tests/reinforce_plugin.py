"""An on-policy objective and a generation backend for the core's tests, in a module of their
own: the conformance suite checks that importing a plugin's module does not import torch."""

import align


class Reinforce:
    """A small on-policy objective: REINFORCE with each group's mean reward as its baseline,
    per completion token; ``reuse`` rounds over two steps. Its advantages come from
    ``align_prepare_rollouts``, which sees every micro-batch of the round at once."""

    def __init__(self, generations=3, reuse=1):
        self.sampling = align.Sampling(generations, reuse)
        self.rounds: list[int] = []  # micro-batches per round, as the hook saw them

    @align.hookimpl
    def align_register_objectives(self, register):
        register(
            align.Objective(
                name="reinforce",
                description="REINFORCE with a group baseline",
                shapes=("prompt_only",),
                sampling=lambda options: self.sampling,
                packable=True,
            )
        )

    @align.hookimpl
    def align_prepare_rollouts(self, batches):
        self.rounds.append(len(batches))
        for batch in batches:
            import torch

            rewards, group = batch["rewards"], batch["group"]
            means = torch.zeros(int(group.max()) + 1).index_add(0, group, rewards)
            means = means / torch.bincount(group).float()
            batch["advantages"] = rewards - means[group]
        return batches

    @align.hookimpl
    def align_loss_counts(self, batch):
        return {"loss": align.sequence_token_counts(batch).sum()}

    @align.hookimpl
    def align_compute_loss(self, model, batch):
        out = align.forward_logps(model, batch)
        advantages = out.per_position(batch["advantages"].to(out.logps.dtype))
        loss = -(advantages * out.logps * out.mask).sum()
        return align.LossOutput(loss=loss, count=out.mask.sum())


class FixedCompletions:
    """A generation backend whose completions depend on the prompt only (not on the seed, the
    process or the micro-batch): "<sum> " and EOS for the first, a wrong sum for the second,
    and a truncated ramble for the third."""

    @align.hookimpl
    def align_register_generators(self, register):
        register(align.Generator("fixed", "completions from the prompt alone", self.generate))

    @staticmethod
    def generate(request):
        tok, out = request.tokenizer, []
        for prompt in request.prompts:
            text = tok.decode(prompt)
            a, b = [int(x) for x in text.split("What is ")[1].split("?")[0].split(" + ")]
            for k in range(request.num_generations):
                if k % 3 == 2:
                    ids = tok.encode(" and so on" * 20, add_special_tokens=False)
                    out.append(ids[: request.max_new_tokens])
                    continue
                words = f"{a} + {b} = {a + b + k}."
                out.append(tok.encode(words, add_special_tokens=False) + [tok.eos_token_id])
        return out


class Needle(align.Fields):
    needle: str


class NeedleReward:
    """A third-party reward in-process: 1 when the completion contains the record's needle."""

    @align.hookimpl
    def align_register_rewards(self, register):
        def found(completions, needle):
            pairs = zip(completions, needle, strict=True)
            return [float(n in align.completion_text(c)) for c, n in pairs]

        register(align.Reward("needle", "has the needle", found, fields=Needle))
