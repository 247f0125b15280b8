"""``align new-plugin NAME``: a ready-to-install objective plugin project to start from."""

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
description = "The {name} objective for align."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["{core_requirement}"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points.align]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]
"""

INIT = '''\
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
            data_format="prompt_completion",  # or "preference", "feedback", "ranked"
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

LOSS = '''\
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

TEST = """\
from align.testing import ObjectiveConformance


class Test{camel}(ObjectiveConformance):
    objective = "{name}"
"""

README = """\
# align-plugin-{name}

The `{name}` objective for [align](https://github.com/align-dev/align).

```bash
pip install -e '.[test]'
align objectives                      # {name} is listed
align run --objective {name}          # the embedded demo
python -m pytest tests                # the align.testing conformance suite
```
"""


def new_plugin(name: str, directory: str | Path = ".") -> Path:
    """Write ``align-plugin-NAME/`` (pyproject, module, README, conformance test) and return it."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*", name):
        raise ConfigError(
            f"plugin name {name!r}: use lower-case letters, digits, '-' or '_', starting with a "
            "letter (it is the objective's name)"
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
    camel = "".join(part.capitalize() for part in re.split(r"[-_]", name))
    files = {
        "pyproject.toml": PYPROJECT.format(name=name, module=module, core_requirement=requirement),
        f"{module}/__init__.py": INIT.format(name=name),
        f"{module}/loss.py": LOSS.format(),
        f"tests/test_{module}.py": TEST.format(name=name, camel=camel),
        "README.md": README.format(name=name),
    }
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
