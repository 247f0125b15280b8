"""Registration through the ``align`` entry point, ``align objectives`` listing it, and ``align run
--objective rloo`` on the demo end to end: the core samples, scores and lays out the rollouts,
this plugin's hooks shape the rewards and train, and the run logs TRL's metric names; padded,
packed and accumulated micro-batches give the same run."""

import json
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
from align_rloo import RLOOOptions

TRL_METRICS = {
    "loss",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_mean",
    "clip_ratio/high_max",
    "clip_ratio/region_mean",
    "frac_reward_zero_std",
    "reward",
    "reward_std",
    "rewards/addition/mean",
    "rewards/addition/std",
    "completions/mean_length",
    "completions/clipped_ratio",
    "num_tokens",
}


# -- registration ---------------------------------------------------------------------------------
def test_the_entry_point_registers_the_objective():
    (point,) = [e for e in entry_points(group="align") if e.name == "rloo"]
    assert point.value == "align_rloo"
    found = load_plugins().objective("rloo")
    assert found.plugin.distribution == "align-plugin-rloo"
    assert not found.plugin.errors
    objective = found.item
    assert objective.shapes == ("prompt_only",) and objective.on_policy and objective.packable
    assert objective.options is RLOOOptions
    assert objective.uses_reference(RLOOOptions())  # β = 0.05, as TRL
    assert not objective.uses_reference(RLOOOptions(beta=0.0))
    sampling = objective.sampling(RLOOOptions(num_generations=5, num_iterations=3))
    assert (sampling.num_generations, sampling.reuse) == (5, 3)


def test_align_objectives_lists_it():
    with registered():
        result = CliRunner().invoke(cli, ["objectives", "--json"])
    assert result.exit_code == 0, result.output
    listed = {item["name"]: item for item in json.loads(result.output)}
    assert listed["rloo"]["status"] == "ok"
    assert listed["rloo"]["distribution"] == "align-plugin-rloo"


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, align_rloo; sys.exit(3 if 'torch' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-500:]


# -- align run ------------------------------------------------------------------------------------
class RightOrWrong:
    """A generation backend whose completions depend on the prompt alone: the right sum for
    even samples, a wrong one for odd samples, each ending with EOS; so every group of the
    `addition` reward holds 1s and 0s."""

    @align.hookimpl
    def align_register_generators(self, register):
        register(align.Generator("right-or-wrong", "right sums, then wrong ones", self.generate))

    @staticmethod
    def generate(request):
        tok, out = request.tokenizer, []
        for prompt in request.prompts:
            text = tok.decode(prompt)
            a, b = [int(x) for x in text.split("What is ")[1].split("?")[0].split(" + ")]
            for k in range(request.num_generations):
                words = f"{a} + {b} = {a + b + k % 2}."
                ids = tok.encode(words, add_special_tokens=False) + [tok.eos_token_id]
                out.append(ids[: request.max_new_tokens])
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from align import demo

    path = tmp_path_factory.mktemp("rloo-model")
    demo.build_demo_model(path)
    return path


def _run(tmp_path, model_dir, name, *extra):
    """``align run`` on the demo's prompts; held out: 4 of the demo's eval prompts (the run's
    final evaluation samples them, not the demo's 200)."""
    from align import demo

    held_out = tmp_path / "held-out.jsonl"
    lines = demo.demo_data("prompt_only", "eval").read_text().splitlines()[:4]
    held_out.write_text("".join(line + "\n" for line in lines))
    args = ["run", "--objective", "rloo", "--model", str(model_dir), "--data", "demo"]
    args += ["--eval-data", str(held_out)]
    args += ["--generator", "right-or-wrong", "--no-eval-on-start", "--lr", "1e-3"]
    args += ["--set", "num_generations=4", "--max-completion-length", "16"]
    args += ["--output-dir", str(tmp_path / name), *extra]
    reset_accelerate()
    try:
        with registered(RightOrWrong()):
            result = CliRunner().invoke(cli, args)
    finally:
        reset_accelerate()
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r) for r in rows if "loss" in json.loads(r)]


def test_a_demo_run_logs_trl_s_metrics(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))  # not the user's cache
    rows = _run(tmp_path, model_dir, "demo", "--batch-size", "2", "--max-steps", "3")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0].keys() >= TRL_METRICS
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
    assert abs(rows[-1]["kl"]) > 1e-4  # and moves away from it
    for row in rows:
        assert row["reward"] == pytest.approx(0.5)  # half of each group is right
        assert row["frac_reward_zero_std"] == 0.0
        assert row["completions/clipped_ratio"] == 0.0
        assert row["clip_ratio/region_mean"] == 0.0  # num_iterations = 1: the ratio is 1
    info = json.loads((tmp_path / "demo" / "run.json").read_text())
    assert info["config"]["objective"] == "rloo"
    assert info["config"]["rloo"]["beta"] == 0.05


def test_accumulated_padded_micro_batches_give_the_packed_one_batch_run(
    tmp_path, model_dir, monkeypatch
):
    """Two micro-batches of one prompt a step, padded, train as one packed batch of two: the
    same loss, metrics and KL at every step (the leave-one-out baselines stay per prompt and
    the loss is divided once per step)."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    one = _run(tmp_path, model_dir, "one", "--batch-size", "2", "--max-steps", "2")
    two = _run(
        tmp_path, model_dir, "two", "--batch-size", "1", "--grad-accum", "2",
        "--no-padding-free", "--max-steps", "2",
    )  # fmt: skip
    assert [r.keys() for r in two] == [r.keys() for r in one]
    assert abs(one[-1]["kl"]) > 1e-4
    for a, b in zip(one, two, strict=True):
        # low_min: an extreme per micro-batch, then their mean, as TRL (0 here either way)
        for key in a.keys() - {"num_tokens_computed"}:
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-4), key
