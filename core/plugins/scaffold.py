"""``align new-plugin NAME``: a ready-to-install plugin project to start from: an objective
(the default), a reward or a data format. Each kind is a set of file templates in ``KINDS``; a
new kind is one more entry there."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError
from .registry import core_version

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "align-plugin-{name}"
version = "0.1.0"
description = "The {name} {kind} for align."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["{core_requirement}"]

[project.optional-dependencies]
test = ["align-core[testing]"]

[project.entry-points.align]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]
"""

OBJECTIVE_INIT = '''\
"""The {name} objective: cite the paper and its equation here."""

from pydantic import Field

import align


class Options(align.Options):
    temperature: float = Field(1.0, gt=0, description="Divides the per-token NLL.")


@align.hookimpl
def align_register_objectives(register):
    register(
        align.Objective(
            name="{name}",
            description="One line for `align objectives`.",
            shapes=("prompt_completion", "conversation"),  # or "preference", "feedback", …
            options=Options,
            needs_reference=False,  # True: the loss hook receives `reference`
            packable=True,  # the loss reads batches only through forward_logps: pack them
        )
    )


@align.hookimpl
def align_loss_counts(batch):  # before the forward: one loss unit per sequence, as loss.py counts
    return {{"loss": len(align.sequence_token_counts(batch))}}


@align.hookimpl
def align_compute_loss(model, batch, options):
    from .loss import loss

    return loss(model, batch, options.temperature)
'''

OBJECTIVE_LOSS = '''\
"""The loss: return the SUM over loss units and their COUNT; the core divides.

Here a unit is a sequence (``align_loss_counts`` in __init__.py gives their number before the
forward); for completion tokens, count ``align.sequence_token_counts(batch).sum()`` there.
"""

import align


def loss(model, batch, temperature):
    out = align.forward_logps(model, batch)  # shifted, float32, masked per-token log-probs
    per_sequence = -out.sums / out.num_tokens / temperature  # replace with your objective
    return align.LossOutput(
        loss=per_sequence.sum(),
        count=len(per_sequence),
        metrics={{"nll": (-out.sums.detach().sum(), out.num_tokens.sum())}},
    )
'''

OBJECTIVE_TEST = """\
from align.testing import ObjectiveConformance


class Test{camel}(ObjectiveConformance):
    objective = "{name}"
"""

OBJECTIVE_README = """\
# align-plugin-{name}

The `{name}` objective for [align](https://github.com/align-dev/align).

```bash
pip install -e '.[test]'
align objectives                      # {name} is listed
align run --objective {name}          # the embedded demo
python -m pytest tests                # the align.testing conformance suite
```
"""


REWARD_INIT = '''\
"""The {name} reward: say what it scores, and cite where it comes from."""

from pydantic import Field

import align


class Options(align.Options):
    target: int = Field(20, ge=1, description="The completion length, in tokens, that scores 1.")


@align.hookimpl
def align_register_rewards(register):
    register(
        align.Reward(
            name="{name}",
            description="One line for `align rewards`.",
            function=reward,
            options=Options,
            # fields=Fields,  # record fields the reward reads: an align.Fields class
        )
    )


def reward(completion_ids, options):
    """One finite float per completion, in their order, each scored on its own (a run calls
    the reward once per micro-batch: never normalise over the call). It may also take
    ``completions`` (strings, or ``[{{"role": "assistant", "content": ...}}]`` for chat
    prompts: ``align.completion_text`` reads either), ``prompts``, ``config`` and the columns
    of its fields."""
    target = options.target
    return [1.0 - min(abs(len(ids) - target), target) / target for ids in completion_ids]
'''

REWARD_TEST = """\
from align.testing import RewardConformance


class Test{camel}(RewardConformance):
    reward = "{name}"
"""

REWARD_README = """\
# align-plugin-{name}

The `{name}` reward for [align](https://github.com/align-dev/align).

```bash
pip install -e '.[test]'
align rewards                    # {name} is listed
python -m pytest tests           # the align.testing conformance suite
align run --objective grpo --reward {name}  # an on-policy objective, on the demo
```
"""

FORMAT_INIT = '''\
"""The {name} data format: say whose records these are, and link their documentation."""

from pydantic import BaseModel

import align


class Columns(BaseModel):
    """The columns the core validates (errors name the file, line and field) before
    ``groups`` sees a record; the required ones identify the format's files."""

    question: str
    answer: str


SAMPLES = (
    {{"question": "What is 1 + 2?", "answer": "1 + 2 = 3."}},
    {{"question": "What is 10 + 20?", "answer": "30.", "source": "web"}},
    {{"question": "What is 3 + 4?", "answer": "3 + 4 = 7."}},
    {{"question": "What is 7 + 30?", "answer": "37."}},
)
TRAINED = tuple([sample["answer"]] for sample in SAMPLES)  # what each sample trains on


def groups(record):
    """One prompt and its answer (the prompt_completion shape): every objective of the
    shape (sft, minorsft, ift, lora-sft, ...) trains on the format's records."""
    data = record.data  # validated by Columns
    prompt = f"Q: {{data['question']}}\\nA: "
    return align.Group(prompt, {{"": data["answer"]}}, fields={{"": "answer"}})


@align.hookimpl
def align_register_formats(register):
    register(
        align.DataFormat(
            name="{name}",
            description="question/answer records: one line for `align formats`.",
            groups=groups,
            shape="prompt_completion",  # or conversation, preference, feedback, ranked, ...
            schema=Columns,
            samples=SAMPLES,
            trained=TRAINED,
        )
    )
'''

FORMAT_TEST = """\
from align.testing import FormatConformance


class Test{camel}(FormatConformance):
    format = "{name}"
"""

FORMAT_README = """\
# align-plugin-{name}

The `{name}` data format for [align](https://github.com/align-dev/align).

```bash
pip install -e '.[test]'
align formats                    # {name} is listed, with the objectives it feeds
python -m pytest tests           # the align.testing conformance suite
align inspect --objective sft --model MODEL --data records.jsonl  # found from its columns
```
"""

# kind -> the files of its project (path -> template; both formatted with name, module, camel,
# kind and core_requirement). The pyproject is every kind's.
KINDS: dict[str, dict[str, str]] = {
    "objective": {
        "{module}/__init__.py": OBJECTIVE_INIT,
        "{module}/loss.py": OBJECTIVE_LOSS,
        "tests/test_{module}.py": OBJECTIVE_TEST,
        "README.md": OBJECTIVE_README,
    },
    "reward": {
        "{module}/__init__.py": REWARD_INIT,
        "tests/test_{module}.py": REWARD_TEST,
        "README.md": REWARD_README,
    },
    "format": {
        "{module}/__init__.py": FORMAT_INIT,
        "tests/test_{module}.py": FORMAT_TEST,
        "README.md": FORMAT_README,
    },
}


def new_plugin(name: str, directory: str | Path = ".", kind: str = "objective") -> Path:
    """Write ``align-plugin-NAME/`` (pyproject, module, README, conformance test) for a plugin
    of ``kind`` (a key of ``KINDS``: ``objective``, ``reward`` or ``format``) and return it."""
    if kind not in KINDS:
        raise ConfigError(f"plugin kind {kind!r}: use one of {', '.join(KINDS)}")
    if not re.fullmatch(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*", name):
        raise ConfigError(
            f"plugin name {name!r}: use lower-case letters, digits, '-' or '_', starting with a "
            f"letter (it is the {kind}'s name)"
        )
    module = "align_" + name.replace("-", "_")
    root = Path(directory) / f"align-plugin-{name}"
    if root.exists():
        raise ConfigError(f"{root} already exists")
    from packaging.version import InvalidVersion, Version

    try:
        major, minor = (*Version(core_version()).release, 0)[:2]
    except InvalidVersion:
        major, minor = 0, 1
    requirement = f"align-core>={major}.{minor},<{major}.{minor + 1}"
    if major:
        requirement = f"align-core>={major}.{minor},<{major + 1}"
    values = {
        "name": name,
        "module": module,
        "camel": "".join(part.capitalize() for part in re.split(r"[-_]", name)),
        "kind": kind,
        "core_requirement": requirement,
    }
    templates = {"pyproject.toml": PYPROJECT, **KINDS[kind]}
    for relative, template in templates.items():
        path = root / relative.format(**values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values), encoding="utf-8")
    return root
