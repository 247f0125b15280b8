"""Registration through the ``align`` entry point, and ``align run --objective online-dpo``
end to end: the core samples, scores and lays out the rollouts, this plugin's hooks pair and
train them, and the run logs TRL's metric names; padded, packed and accumulated micro-batches
give the same run."""

import json
import math
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from click.testing import CliRunner

import align
from align.cli import cli
from align.plugins.registry import load_plugins
from align.testing import registered, reset_accelerate
from align_online_dpo import OnlineDPOOptions

TRL_METRICS = {
    "loss",
    "beta",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "objective/scores_margin",
    "val/contain_eos_token",
}
PROMPTS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": a + b}
    for a, b in [(1, 2), (10, 20), (3, 4), (7, 30), (12, 1), (5, 5), (40, 2), (8, 9)]
]


# -- registration ---------------------------------------------------------------------------------
def test_the_entry_point_registers_the_objective():
    (point,) = [e for e in entry_points(group="align") if e.name == "online-dpo"]
    assert point.value == "align_online_dpo"
    registry = load_plugins()
    found = registry.objective("online-dpo")
    assert found.plugin.distribution == "align-plugin-online-dpo"
    assert found.plugin.version == "0.1.0"
    assert not found.plugin.errors
    objective = found.item
    assert objective.shapes == ("prompt_only",)
    assert objective.uses_reference(OnlineDPOOptions())
    assert objective.packable and objective.disable_dropout and objective.on_policy
    assert objective.options is OnlineDPOOptions
    sampling = objective.sampling(OnlineDPOOptions())
    assert (sampling.num_generations, sampling.reuse) == (2, 1)
    assert {"align_prepare_rollouts", "align_compute_loss"} <= set(found.plugin.hooks)


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, align_online_dpo; sys.exit(3 if 'torch' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-500:]


# -- align run ------------------------------------------------------------------------------------
class RightThenWrong:
    """A generation backend whose completions depend on the prompt alone: the right sum, then
    a wrong one, each ending with EOS; so each pair is one `addition` reward of 1 and one of 0,
    and the first sample is chosen."""

    @align.hookimpl
    def align_register_generators(self, register):
        register(align.Generator("right-then-wrong", "the right sum, then a wrong one", self.gen))

    @staticmethod
    def gen(request):
        tok, out = request.tokenizer, []
        for prompt in request.prompts:
            text = tok.decode(prompt)
            a, b = [int(x) for x in text.split("What is ")[1].split("?")[0].split(" + ")]
            for k in range(request.num_generations):
                words = f"{a} + {b} = {a + b + k}."
                ids = tok.encode(words, add_special_tokens=False) + [tok.eos_token_id]
                out.append(ids[: request.max_new_tokens])
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from align import demo

    path = tmp_path_factory.mktemp("online-dpo-model")
    demo.build_demo_model(path)
    return path


def _run(tmp_path, model_dir, name, *extra):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    args = ["run", "--objective", "online-dpo", "--model", str(model_dir), "--data", str(data)]
    args += ["--reward", "addition", "--generator", "right-then-wrong", "--lr", "1e-3"]
    args += ["--max-completion-length", "16", "--max-steps", "3", "--output-dir"]
    args += [str(tmp_path / name), *extra]
    reset_accelerate()
    try:
        with registered(RightThenWrong()):
            result = CliRunner().invoke(cli, args)
    finally:
        reset_accelerate()
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r) for r in rows]


def test_a_run_pairs_by_reward_and_logs_trl_s_metrics(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))  # not the user's cache
    one = _run(tmp_path, model_dir, "one", "--batch-size", "4")
    assert [r["step"] for r in one] == [1, 2, 3]
    first = one[0]
    assert first.keys() >= TRL_METRICS
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    for row in one:
        assert row["objective/scores"] == pytest.approx(0.5)  # one right sum in each pair
        assert row["objective/scores_margin"] == pytest.approx(1.0)  # and it is chosen
        assert row["val/contain_eos_token"] == 1.0
        assert row["beta"] == pytest.approx(0.1, abs=1e-7)
    assert one[-1]["rewards/margins"] > 0  # the policy moved towards the right sums
    assert one[-1]["loss"] < math.log(2)

    # two micro-batches a step, and the padded layout: the same run
    two = _run(tmp_path, model_dir, "two", "--batch-size", "2", "--grad-accum", "2")
    padded = _run(tmp_path, model_dir, "padded", "--batch-size", "4", "--no-padding-free")
    for other in (two, padded):
        assert [r.keys() for r in other] == [r.keys() for r in one]
        for a, b in zip(one, other, strict=True):
            for key in a.keys() - {"num_tokens_computed"}:
                # objective/kl: a difference of two float32 sums of ~100 nats, unscaled by β
                tolerance = 1e-4 if key == "objective/kl" else 1e-5
                assert b[key] == pytest.approx(a[key], abs=tolerance, rel=1e-5), key
