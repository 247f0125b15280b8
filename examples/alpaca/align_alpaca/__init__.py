"""The Alpaca data format (Taori et al. 2023): ``instruction``/``input``/``output`` records,
the prompt rendered with the Stanford Alpaca template. Its groups are prompt_completion-shaped,
so it feeds every objective of that shape: ``align run --objective sft --data alpaca.json``."""

from pydantic import BaseModel, Field

import align

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class AlpacaRecord(BaseModel):
    """The columns the core validates before ``alpaca_group`` sees a record."""

    instruction: str = Field(min_length=1)
    input: str = ""  # optional: absent, null or "" renders the template without an input
    output: str


def render_prompt(instruction: str, context: str = "") -> str:
    template = WITH_INPUT if context.strip() else WITHOUT_INPUT
    return template.format(instruction=instruction, input=context)


def alpaca_group(record: align.Record) -> align.Group:
    """One prompt (the rendered template) and one answer (``output``), trained on the answer."""
    data = record.data  # validated by AlpacaRecord
    prompt = render_prompt(data["instruction"], data["input"])
    return align.Group(prompt, answers={"": data["output"]}, fields={"": "output"})


SAMPLES = (
    {"instruction": "Add the two numbers.", "input": "1 + 2", "output": "1 + 2 = 3."},
    {"instruction": "Name a primary colour.", "output": "Blue."},
    {"instruction": "Add the two numbers.", "input": "10 + 20", "output": "10 + 20 = 30. ok"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
)
TRAINED = tuple([sample["output"]] for sample in SAMPLES)  # each sample trains on its output


@align.hookimpl
def align_register_formats(register):
    register(
        align.DataFormat(
            name="alpaca",
            description="instruction/input/output records (input optional), Alpaca template",
            groups=alpaca_group,
            shape="prompt_completion",  # feeds sft, minorsft, ift, lora-sft, …
            schema=AlpacaRecord,  # instruction and output, required, identify its records
            samples=SAMPLES,
            trained=TRAINED,
        )
    )
