"""``align objectives`` lists an objective that two plugins register: with the clash (who
registers it, and that ``align run`` refuses it), in text and JSON, and exits with status 1
as ``align plugins`` does for plugin errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

import align
from align.cli import cli
from align.testing import registered

REFUSAL = (
    "objective 'sft' is registered by both align-plugin-sft and clash-in-process; "
    "uninstall one of them"
)


class Clash:
    """A second plugin that registers ``sft``."""

    __name__ = "clash-in-process"

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="sft", description="another sft"))


def _objectives(*args):
    with registered(Clash()):
        return CliRunner().invoke(cli, ["objectives", *args])


def test_a_clashing_objective_is_listed_with_its_clash():
    result = _objectives()
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    start = lines.index("sft  (clash: align-plugin-sft and clash-in-process)")
    assert lines[start + 1] == f"  error: `align run --objective sft` refuses it: {REFUSAL}"
    assert lines[start + 2].startswith("  align-plugin-sft: ")
    assert lines[start + 3] == "  clash-in-process: another sft"
    assert "dpo  (align-plugin-dpo)" in lines  # the others are listed as before
    start = lines.index("reward-model  (align-plugin-reward-model)")
    assert "  trains a reward model: AutoModelForSequenceClassification, one score" in lines[start:]


def test_a_clashing_objective_is_in_the_json_listing():
    result = _objectives("--json")
    assert result.exit_code == 1
    listed = {item["name"]: item for item in json.loads(result.output)}
    sft = listed["sft"]
    assert sft["status"] == "clash" and sft["error"] == REFUSAL
    assert [r["distribution"] for r in sft["registered_by"]] == [
        "align-plugin-sft",
        "clash-in-process",
    ]
    assert sft["registered_by"][1]["description"] == "another sft"
    assert listed["dpo"]["status"] == "ok" and listed["dpo"]["distribution"] == "align-plugin-dpo"
    assert (listed["dpo"]["model_class"], listed["reward-model"]["model_class"]) == (
        "causal_lm",
        "sequence_classification",
    )


def test_without_a_clash_the_listing_exits_0_and_marks_every_objective_ok():
    with registered():
        result = CliRunner().invoke(cli, ["objectives", "--json"])
    assert result.exit_code == 0
    assert {item["status"] for item in json.loads(result.output)} == {"ok"}
