"""A generation backend for the rloo run tests, and ``align run`` with it registered in-process,
for torchrun to start on each process: ``python rloo_worker.py <align run args>``."""

import sys

import align
from align.cli import cli
from align.testing import registered


class DistinctSums:
    """Completions that depend on the prompt alone (not on the seed, the process or the
    micro-batch), all different within a group: sample k answers ``a + b + (k·a mod 3) mod 3``
    followed by k " !" and EOS, so a group holds right and wrong sums (or, for ``a`` a multiple
    of 3, only right ones) and every completion its own KL."""

    @align.hookimpl
    def align_register_generators(self, register):
        register(align.Generator("distinct-sums", "right and wrong sums", self.generate))

    @staticmethod
    def generate(request):
        tok, out = request.tokenizer, []
        for prompt in request.prompts:
            text = tok.decode(prompt)
            a, b = [int(x) for x in text.split("What is ")[1].split("?")[0].split(" + ")]
            for k in range(request.num_generations):
                words = f"{a} + {b} = {a + b + (k * (a % 3)) % 3}" + " !" * k + "."
                ids = tok.encode(words, add_special_tokens=False) + [tok.eos_token_id]
                out.append(ids[: request.max_new_tokens])
        return out


if __name__ == "__main__":
    with registered(DistinctSums()):
        cli.main(["run", *sys.argv[1:]], standalone_mode=True)
