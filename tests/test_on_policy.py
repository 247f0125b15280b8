"""On-policy objectives in the core: prompt-only data, generation (seeded, EOS and truncation),
reward functions (first-party vectors, errors that name the reward and the record, options),
rollout batches through every hook, and runs that equal each other however the step's prompts
are split (micro-batches, packed or padded) and however often they are interrupted."""

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from reinforce_plugin import FixedCompletions, Reinforce

import align
from align.cli import cli
from align.config import resolve
from align.data.examples import tokenize_records
from align.data.records import read_records
from align.errors import AlignError, DataError, PluginError
from align.loop.resume import complete_checkpoints
from align.plugins import get_registry
from align.rollout.generate import cut_at_eos, sampling_context, transformers_generate
from align.rollout.rewards import REWARDS, ChosenReward, RewardSet, addition, format_reward, length
from align.testing import ObjectiveConformance, registered

PROMPTS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": a + b}
    for a, b in [(1, 2), (10, 20), (3, 4), (7, 30), (12, 1), (5, 5), (40, 2), (8, 9)]
]


@pytest.fixture
def prompts_file(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def _run(*args, expect=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# -- prompt-only data ----------------------------------------------------------------------------
def test_prompt_only_records_become_prompts_to_sample_from(tmp_path, write_jsonl, tokenizer):
    rows = [
        PROMPTS[0],
        {"prompt": "Plain text prompt ", "answer": 3, "id": "x"},
        {"prompt": [{"role": "user", "content": "long " * 200}], "answer": 1},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    fmt = get_registry().formats["prompt_only"].item
    reward_fields = REWARDS[0].fields  # addition's answer
    examples, report = tokenize_records(
        read_records(str(path)), fmt, tokenizer, 32, "keep_end", "train", fields=reward_fields
    )
    chat = tokenizer.apply_chat_template(PROMPTS[0]["prompt"], add_generation_prompt=True)
    chat = chat["input_ids"]
    assert examples[0]["prompt_input_ids"] == chat  # ends with the generation prompt
    assert tokenizer.decode(examples[0]["prompt_input_ids"]).endswith("<|assistant|>\n")
    plain = examples[1]["prompt_input_ids"]
    assert plain[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in plain
    assert [e["answer"] for e in examples] == [3.0, 3.0, 1.0]
    assert examples[0]["prompt"] == PROMPTS[0]["prompt"]  # as the reward functions see it
    assert len(examples[2]["prompt_input_ids"]) == 32 and report.truncated == 1
    assert report.ignored_columns == {"id": 1}

    bad = write_jsonl(tmp_path / "bad.jsonl", [PROMPTS[0], {"prompt": "x", "answer": "many"}])
    with pytest.raises(DataError, match="line 2, field 'answer': expected a number"):
        tokenize_records(
            read_records(str(bad)), fmt, tokenizer, 32, "keep_end", "train", reward_fields
        )
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": ""}])
    with pytest.raises(DataError, match="line 1, field 'prompt'"):
        tokenize_records(read_records(str(empty)), fmt, tokenizer, 32, "keep_end", "train")


# -- generation ----------------------------------------------------------------------------------
def test_generation_is_seeded_and_ends_at_eos_or_is_truncated(model_dir, tokenizer):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    accelerator = Accelerator(cpu=True)
    prompts = [
        tokenizer.apply_chat_template(p["prompt"], add_generation_prompt=True)["input_ids"]
        for p in PROMPTS[:3]
    ]

    def sample(seed, temperature=1.0):
        request = align.GenerationRequest(
            model=model, tokenizer=tokenizer, prompts=prompts, num_generations=4,
            max_new_tokens=6, temperature=temperature, top_p=1.0, top_k=0, min_p=None,
            repetition_penalty=1.0, eos_token_ids=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id, seed=seed,
        )  # fmt: skip
        with sampling_context(model, accelerator, seed) as policy:
            request.model = policy
            return transformers_generate(request)

    torch.manual_seed(0)
    before = torch.rand(1)
    first = sample(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), before)  # sampling leaves the training RNG alone
    assert first == sample(1) and first != sample(2)
    assert len(first) == 12 and all(1 <= len(c) <= 6 for c in first)
    for ids in first:
        assert tokenizer.eos_token_id not in ids[:-1]  # nothing after the first EOS
    greedy = sample(1, temperature=0)
    assert greedy[0] == greedy[1] == greedy[2] == greedy[3] == sample(2, temperature=0)[0]
    assert model.training  # the mode it had before sampling
    assert cut_at_eos([5, 2, 7, 2], {2}) == [5, 2] and cut_at_eos([5, 7], {2}) == [5, 7]


# -- rewards -------------------------------------------------------------------------------------
def test_first_party_reward_vectors():
    chat = [{"role": "assistant", "content": "7 + 12 = 19."}]
    assert addition(["7 + 12 = 19.", "It is 18.", "no number", chat], [19, 19, 19, 19]) == [
        1.0, 0.0, 0.0, 1.0,
    ]  # fmt: skip
    working = REWARDS[0].options(working=True)
    prompts = ["What is 7 + 12?", [{"role": "user", "content": "What is 7 + 12?"}]] * 2
    restated = ["7 + 12 = 19.", "19.", "8 + 11 = 19.", "7 + 12 = 18."]
    assert addition(restated, [19] * 4, prompts, working) == [1.0, 1.0, 0.0, 0.0]
    assert addition(restated, [19] * 4, prompts) == [1.0, 1.0, 1.0, 0.0]  # the last number only
    options = REWARDS[1].options(max_length=10, cache=4)
    assert length([[0] * n for n in (5, 6, 7, 9, 10, 11)], options, None) == [
        0.0, 0.0, -0.25, -0.75, -1.0, -1.0,
    ]  # fmt: skip
    config = type("C", (), {"max_completion_length": 8})()
    assert length([[0] * 6], REWARDS[1].options(cache=4), config) == [-0.5]  # (4 - 6) / 4
    think = "<think>\nadd\n</think>\n<answer>\n19\n</answer>"
    assert format_reward([think, think + " more", "19"], REWARDS[2].options()) == [1.0, 0.0, 0.0]
    digits = REWARDS[2].options(pattern=r"\d+ \+ \d+ = \d+\.")
    assert format_reward(["1 + 2 = 3.", "1 + 2 = 3. ok"], digits) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a regular expression"):
        REWARDS[2].options(pattern="(")


def _reward(function, fields=None):
    return ChosenReward(align.Reward("mine", "a test reward", function, fields), 1.0, None, "t")


def test_a_reward_that_fails_is_named_with_the_record():
    def picky(completions):
        if any("boom" in c for c in completions):
            raise ValueError("cannot score")
        return [1.0] * len(completions)

    rewards = RewardSet([_reward(picky)], None, "train.jsonl")
    args = (["p"] * 3, ["ok", "boom", "ok"], [[1]] * 3, {}, ["line 1", "line 2", "line 3"])
    expected = r"reward 'mine' \(t\) raised ValueError: cannot score on a completion of "
    with pytest.raises(PluginError, match=expected + "train.jsonl, line 2"):
        rewards.score(*args)
    for bad in ([1.0, math.nan, 0.0], [1.0, None, 0.0], [1.0]):
        rewards = RewardSet([_reward(lambda completions, b=bad: b)], None, "train.jsonl")
        with pytest.raises(PluginError, match="reward 'mine'"):
            rewards.score(*args)
    with pytest.raises(PluginError, match="train.jsonl, line 2: rewards must be finite"):
        RewardSet([_reward(lambda completions: [0, math.inf, 0])], None, "train.jsonl").score(*args)


def test_a_reward_gets_the_arguments_it_names():
    seen = {}

    def everything(**kwargs):
        seen.update(kwargs)
        return [0.0, 1.0]

    rewards = RewardSet([_reward(everything), _reward(lambda completions: [2.0, 3.0])], None, None)
    values = rewards.score(["p", "p"], ["a", "b"], [[1], [2, 3]], {"answer": [1, 2]}, ["l1", "l2"])
    assert values == [[0.0, 1.0], [2.0, 3.0]]
    assert seen["completion_ids"] == [[1], [2, 3]] and seen["answer"] == [1, 2]
    assert seen["prompts"] == ["p", "p"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--objective", "sft", "--temperature", "0.5"], "--temperature: objective 'sft'"),
        (["--objective", "sft", "--reward", "addition"], "--reward: objective 'sft'"),
        (["--reward", "additon"], "unknown reward 'additon'. Did you mean 'addition'?"),
        (["--reward", "addition=lots"], "the weight after '=' must be a number"),
        (["--reward", "addition", "--reward", "addition=2"], "reward 'addition' is given twice"),
        (["--reward", "format", "--set", "reward.format.patern=x"], "Did you mean 'pattern'?"),
        (["--reward", "addition", "--set", "reward.format.pattern=x"], "add --reward format"),
        (["--reward", "addition", "--generator", "vlm"], "unknown generator 'vlm'"),
        (["--reward", "addition", "--reference", "precomputed"], "no pass before training"),
    ],
)
def test_sampling_options_are_checked(args, message):
    flags, sets, i = {}, [], 0
    names = {"--objective": "objective", "--temperature": "temperature", "--reward": "rewards",
             "--generator": "generator", "--reference": "reference"}  # fmt: skip
    while i < len(args):
        if args[i] == "--set":
            sets.append(args[i + 1])
        elif names[args[i]] == "rewards":
            flags.setdefault("rewards", []).append(args[i + 1])
        else:
            flags[names[args[i]]] = args[i + 1]
        i += 2
    flags.setdefault("objective", "reinforce")
    with registered(Reinforce()), pytest.raises(AlignError, match=message):
        resolve(get_registry(), flags=flags, sets=sets)


def test_rewards_from_a_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "objective: reinforce\nrewards: {addition: 1, format: 0.5}\n"
        "reward:\n  format:\n    pattern: '\\d+'\n"
    )
    with registered(Reinforce(), only=True):
        spec = resolve(get_registry(), config_file=str(config))
    assert [(c.name, c.weight) for c in spec.rewards] == [("addition", 1.0), ("format", 0.5)]
    assert spec.rewards[1].options.pattern == r"\d+"
    assert spec.as_dict()["reward"]["format"] == {"weight": 0.5, "pattern": r"\d+"}


# -- runs ----------------------------------------------------------------------------------------
def _fixed_run(tmp_path, model_dir, data, name, *extra, plugin=None):
    out = tmp_path / name
    args = ["--objective", "reinforce", "--model", model_dir, "--data", data, "--lr", "1e-3"]
    args += ["--reward", "addition", "--reward", "length=0.5", "--set", "reward.length.cache=4"]
    args += ["--generator", "fixed", "--max-completion-length", "8", "--max-steps", "2"]
    with registered(plugin or Reinforce(), FixedCompletions(), only=True):
        _run(*args, "--output-dir", out, *extra)
    return _rows(out)


def _same(a_rows, b_rows, skip=("num_tokens_computed",)):
    assert len(a_rows) == len(b_rows)
    for a, b in zip(a_rows, b_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - set(skip):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), key


def test_a_round_is_scored_and_logged_as_trl_names_it(tmp_path, model_dir, prompts_file):
    rows = _fixed_run(tmp_path, model_dir, prompts_file, "a", "--batch-size", "4")
    first = rows[0]
    # Completions per prompt: the right sum, a wrong one (both 9 or 10 tokens with EOS, over
    # the limit of 8? no: each fits), and a truncated ramble of 8 tokens.
    assert first["rewards/addition/mean"] == pytest.approx(1 / 3)
    assert first["completions/clipped_ratio"] == pytest.approx(1 / 3)
    assert first["completions/max_length"] == 8
    for key in ("reward", "reward_std", "rewards/length/mean", "rewards/length/std",
                "completions/mean_length", "completions/min_length",
                "completions/mean_terminated_length", "loss", "grad_norm"):  # fmt: skip
        assert key in first, key
    assert first["reward"] == pytest.approx(
        first["rewards/addition/mean"] + 0.5 * first["rewards/length/mean"]
    )


def test_micro_batches_and_layouts_do_not_change_a_round(tmp_path, model_dir, prompts_file):
    """Four prompts a step in one micro-batch, in two (grad-accum 2), padded: the same losses,
    gradient norms and round metrics; align_prepare_rollouts sees the whole round each time."""
    plugin = Reinforce()
    one = _fixed_run(tmp_path, model_dir, prompts_file, "one", "--batch-size", "4")
    two = _fixed_run(
        tmp_path, model_dir, prompts_file, "two", "--batch-size", "2", "--grad-accum", "2",
        plugin=plugin,
    )  # fmt: skip
    padded = _fixed_run(
        tmp_path, model_dir, prompts_file, "padded", "--batch-size", "4", "--no-padding-free"
    )
    _same(one, two)
    _same(one, padded)
    assert plugin.rounds == [2, 2]
    info = json.loads((tmp_path / "one" / "run.json").read_text())
    assert info["packed_batches"] is True
    assert info["config"]["reward"]["length"] == {"weight": 0.5, "max_length": None, "cache": 4}


def test_an_on_policy_objective_needs_a_reward(tmp_path, model_dir, prompts_file):
    with registered(Reinforce(), only=True):
        result = _run("--objective", "reinforce", "--model", model_dir, "--data", prompts_file,
                      "--output-dir", tmp_path / "x", expect=1)  # fmt: skip
    assert "give --reward NAME[=WEIGHT]" in result.output


def test_a_share_of_data_rounds_on_prompt_only_data_is_refused(tmp_path, model_dir, prompts_file):
    """Sampling(on_policy_share < 1) trains the other rounds on the data's completions: a
    prompt-only file has none, said before training (not a KeyError at the first such round)."""
    plugin = Reinforce()
    plugin.sampling = align.Sampling(3, on_policy_share=0.5)
    args = ["--objective", "reinforce", "--model", model_dir, "--data", prompts_file]
    args += ["--reward", "addition", "--generator", "fixed", "--max-completion-length", "8"]
    with registered(plugin, FixedCompletions(), only=True):
        result = _run(*args, "--max-steps", "4", "--output-dir", tmp_path / "x", expect=1)
    assert "on_policy_share=0.5" in result.output and str(prompts_file) in result.output
    assert "prompts only" in result.output and "KeyError" not in result.output


def test_a_resumed_on_policy_run_samples_what_the_uninterrupted_one_did(
    tmp_path, model_dir, prompts_file
):
    """Real sampling (the transformers backend) with rounds reused for two steps: stopped at
    step 3, in the middle of a round, the resumed run trains on the saved round and then
    samples the same completions as the uninterrupted run (metrics and weights equal)."""
    args = ["--objective", "reinforce", "--model", model_dir, "--data", prompts_file]
    args += ["--reward", "addition", "--reward", "length", "--max-completion-length", "6"]
    args += ["--batch-size", "2", "--max-steps", "6", "--save-every", "3", "--lr", "1e-2"]
    with registered(Reinforce(generations=2, reuse=2), only=True):
        _run(*args, "--output-dir", tmp_path / "a")
        assert [s for s, _ in complete_checkpoints(tmp_path / "a")] == [3]
        assert (tmp_path / "a/checkpoints/step-3/state/rollouts_0.pt").exists()
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        shutil.rmtree(tmp_path / "b" / "final")
        rows = [r for r in _rows(tmp_path / "a") if r["step"] <= 3]
        (tmp_path / "b/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        info = json.loads((tmp_path / "b/run.json").read_text())
        (tmp_path / "b/run.json").write_text(json.dumps({**info, "status": "running"}))
        result = _run(*args, "--output-dir", tmp_path / "b", "--resume")
    assert "Resuming at step 3 of 6" in result.output
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    _same(a, b, skip=())
    assert {r["step"] for r in a if "reward" in r} == {1, 3, 5}  # a round every second step
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a/final/model.safetensors"))
    wb = load_file(str(tmp_path / "b/final/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_demo_data_and_default_reward(tmp_path, model_dir):
    """`--data demo` is the objective's bundled data; the demo's sums reward `addition`."""
    with registered(Reinforce(generations=2), only=True):
        _run("--objective", "reinforce", "--model", model_dir, "--data", "demo",
             "--max-steps", "1", "--batch-size", "2", "--max-completion-length", "4",
             "--output-dir", tmp_path / "d")  # fmt: skip
    info = json.loads((tmp_path / "d" / "run.json").read_text())
    assert info["data"]["train"]["path"].endswith("prompt_only_train.jsonl")
    assert info["data"]["eval"]["path"].endswith("prompt_only_eval.jsonl")
    assert "addition" in info["config"]["reward"]
    from align import demo

    for key, value in {**demo.DEMO_SETTINGS, **demo.ON_POLICY_DEMO_SETTINGS}.items():
        if key not in ("max_steps", "batch_size", "max_completion_length"):  # given above
            assert info["config"][key] == value, key
    with registered(Reinforce(), only=True), pytest.raises(AlignError, match="no demo data"):
        from align.loop.setup import apply_demo_defaults

        spec = resolve(get_registry(), flags={"objective": "reinforce", "model": "m"})
        spec.config = spec.config.model_copy(update={"data": "demo"})
        object.__setattr__(spec.objective, "item", _without_demo(spec.objective.item))
        apply_demo_defaults(spec, get_registry())


def _without_demo(objective):
    import dataclasses

    return dataclasses.replace(objective, shapes=("ranked_without_demo",))


class TestReinforceConformance(ObjectiveConformance):
    """The conformance suite on an on-policy objective: rollout batches in every check."""

    objective = "reinforce"
    plugin = Reinforce(generations=3)


def test_a_plugins_reward_reads_its_own_field(tmp_path, model_dir, write_jsonl):
    """The field a reward declares is validated in every record (an error names the line and
    the field) and reaches the function; the column is not reported as ignored."""
    from reinforce_plugin import NeedleReward

    rows = [{**p, "needle": "="} for p in PROMPTS[:4]]
    data = write_jsonl(tmp_path / "n.jsonl", rows)
    args = ["--objective", "reinforce", "--model", model_dir, "--reward", "needle"]
    args += ["--generator", "fixed", "--max-completion-length", "8", "--max-steps", "1"]
    with registered(Reinforce(), FixedCompletions(), NeedleReward(), only=True):
        _run(*args, "--data", data, "--batch-size", "4", "--output-dir", tmp_path / "ok")
        bad = write_jsonl(tmp_path / "bad.jsonl", [*rows[:2], {"prompt": "x", "needle": [1]}])
        result = _run(*args, "--data", bad, "--output-dir", tmp_path / "bad", expect=1)
    assert "bad.jsonl, line 3, field 'needle': expected a string" in result.output
    (row,) = _rows(tmp_path / "ok")
    assert row["rewards/needle/mean"] == pytest.approx(2 / 3)  # all but the ramble have "="
    info = json.loads((tmp_path / "ok" / "run.json").read_text())
    assert info["data"]["train"]["ignored_columns"] == {"answer": 4}


class ReservedFieldReward:
    @align.hookimpl
    def align_register_rewards(self, register):
        class Clash(align.Fields):
            index: int

        register(align.Reward("clash", "reads index", lambda completions: [0.0], fields=Clash))


def test_a_reward_field_named_like_a_core_key_is_refused_at_registration():
    with registered(ReservedFieldReward(), only=True) as registry:
        assert "clash" not in registry.rewards
        (info,) = [p for p in registry.plugins.values() if p.errors]
        assert "reward 'clash': field 'index' is a name the core's batches use" in info.errors[0]
