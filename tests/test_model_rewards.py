"""Rewards from a model (``--reward model:PATH``): the scores equal the reward model's own forward
on the texts TRL renders (and TRL's ``_calculate_rewards`` live), with the reward model's own
tokenizer and chat template; a GRPO run on the demo logs them and weighs them with the others;
bad reward models are refused before anything is loaded."""

import contextlib
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import align
from align.cli import cli
from align.config import resolve
from align.errors import AlignError, ConfigError, PluginError
from align.plugins import get_registry
from align.rollout.model_reward import ModelReward, ModelRewardOptions, reward_name
from align.rollout.rewards import ChosenReward, RewardSet

CHAT = [
    [{"role": "user", "content": "What is 7 + 12?"}],
    [{"role": "user", "content": "What is 30 + 4?"}],
    [{"role": "user", "content": "What is 5 + 5?"}],
]
ANSWERS = [
    [{"role": "assistant", "content": "7 + 12 = 19."}],
    [{"role": "assistant", "content": "It is 39, I think, or maybe more than that."}],
    [{"role": "assistant", "content": "10."}],
]
PLAIN = ["What is 7 + 12? ", "What is 30 + 4? ", "What is 5 + 5? "]
PLAIN_ANSWERS = ["7 + 12 = 19.", "It is 39, I think, or maybe more than that.", "10."]
OTHER_TEMPLATE = (
    "{% for message in messages %}### {{ message['role'] | upper }}: {{ message['content'] }}\n"
    "{% endfor %}"
)


def _reward_model(directory, tokenizer, num_labels=1, seed=0, **config):
    """A tiny LlamaForSequenceClassification for ``tokenizer``, saved with it (safetensors)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(LlamaConfig(**{**settings, **config}))
    with torch.no_grad():  # a score head of real size: rewards that differ by more than noise
        model.score.weight.normal_(0, 1.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _other_tokenizer():
    """A tokenizer unlike the policy's: another vocabulary (word-level), another chat template,
    no pad token (padded with EOS, as TRL does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "###",
        "USER",
        "ASSISTANT",
        ":",
        "What",
        "is",
        "it",
        "I",
        "think",
        "or",
        "maybe",
        "more",
        "than",
        "that",
        "?",
        ",",
        "=",
        "+",
        ".",
    ]
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab.update({str(n): len(vocab) + n for n in range(100)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits()]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    fast.chat_template = OTHER_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def reward_dir(tokenizer, tmp_path_factory):
    """A reward model with the demo policy's tokenizer, laid out as an align run's final/."""
    return _reward_model(tmp_path_factory.mktemp("rm") / "rm" / "final", tokenizer)


@pytest.fixture(scope="session")
def other_reward_dir(tmp_path_factory):
    return _reward_model(tmp_path_factory.mktemp("other-rm"), _other_tokenizer(), seed=1)


def _device():
    return SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)


def _loaded(path):
    reward = ModelReward(str(path), reward_name(str(path)))
    reward.load(SimpleNamespace(trust_remote_code=False), _device())
    return reward


def _direct(path, texts):
    """Each text scored alone by the saved model, as its own forward reads it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [
            model(**tokenizer(t, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
            for t in texts
        ]


# -- the scores ----------------------------------------------------------------------------------
def test_chat_scores_use_the_reward_models_template_and_equal_its_forward(reward_dir):
    reward = _loaded(reward_dir)
    texts = [  # the demo template, written out: TRL's apply_chat_template of prompt + completion
        f"<s><|user|>\n{p[0]['content']}</s>\n<|assistant|>\n{c[0]['content']}</s>\n"
        for p, c in zip(CHAT, ANSWERS, strict=True)
    ]
    assert reward.texts(CHAT, ANSWERS) == texts
    expected = _direct(reward_dir, texts)
    for batch_size in (1, 2, 32):  # padded on the right or not at all: the same scores
        scores = reward(CHAT, ANSWERS, ModelRewardOptions(batch_size=batch_size))
        assert scores == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 3) for s in expected}) == 3  # scores that differ: the test can fail


def test_plain_text_scores_are_prompt_plus_completion(reward_dir):
    reward = _loaded(reward_dir)
    texts = [p + c for p, c in zip(PLAIN, PLAIN_ANSWERS, strict=True)]
    scores = reward(PLAIN, PLAIN_ANSWERS, ModelRewardOptions(batch_size=2))
    assert scores == pytest.approx(_direct(reward_dir, texts), abs=1e-5)


def test_a_reward_model_with_its_own_vocabulary_and_template(other_reward_dir, tokenizer):
    reward = _loaded(other_reward_dir)
    assert reward.tokenizer.pad_token == "[EOS]"  # none saved: EOS, as TRL
    assert reward.model.config.pad_token_id == reward.tokenizer.eos_token_id
    texts = reward.texts(CHAT, ANSWERS)
    assert texts[0] == "### USER: What is 7 + 12?\n### ASSISTANT: 7 + 12 = 19.\n"
    scores = reward(CHAT, ANSWERS, ModelRewardOptions(batch_size=3))
    assert scores == pytest.approx(_direct(other_reward_dir, texts), abs=1e-5)
    ids = reward.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert ids != tokenizer(texts[0], add_special_tokens=False)["input_ids"]  # another vocabulary


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
@pytest.mark.parametrize("which", ["reward_dir", "other_reward_dir"])
def test_scores_equal_trls_calculate_rewards(chat, which, request):
    """TRL 1.16's GRPOTrainer._calculate_rewards, live, on the same reward model and texts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOTrainer

    path = request.getfixturevalue(which)
    prompts, completions = (CHAT, ANSWERS) if chat else (PLAIN, PLAIN_ANSWERS)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(path)
    if rm_tokenizer.pad_token_id is None:  # what GRPOTrainer.__init__ does to them
        rm_tokenizer.pad_token = rm_tokenizer.eos_token
    model.config.pad_token_id = rm_tokenizer.pad_token_id
    trainer = object.__new__(GRPOTrainer)  # the attributes _calculate_rewards reads, no more
    cpu = torch.device("cpu")
    trainer.__dict__.update(
        accelerator=SimpleNamespace(device=cpu, is_main_process=True),
        args=SimpleNamespace(device=cpu, report_to=[]),
        state=SimpleNamespace(global_step=0),
        is_deepspeed_enabled=False,
        reward_funcs=[model],
        reward_processing_classes=[rm_tokenizer],
        reward_func_names=["rm"],
        environments=None,
        chat_template_kwargs={},
        _log_completion_extra=None,
        _log_metric=None,
    )
    inputs = [{"prompt": p} for p in prompts]
    trl = trainer._calculate_rewards(inputs, prompts, completions, [[1]] * len(prompts))
    scores = _loaded(path)(prompts, completions, ModelRewardOptions(batch_size=2))
    assert scores == pytest.approx(trl[:, 0].tolist(), abs=1e-5)


def test_a_text_longer_than_the_reward_model_keeps_its_end_and_is_counted(
    tokenizer, tmp_path, caplog
):
    path = _reward_model(tmp_path / "short", tokenizer, max_position_embeddings=12)
    reward = _loaded(path)
    assert reward.max_length == 12
    texts = reward.texts(CHAT, ANSWERS)
    ids = [reward.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(len(x) > 12 for x in ids[1:])
    with caplog.at_level("DEBUG", logger="align.run"):
        scores = reward(CHAT, ANSWERS, ModelRewardOptions())
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([x[-12:]])).logits[0, 0].item() for x in ids]
    assert scores == pytest.approx(expected, abs=1e-5)
    said = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    cut = sum(len(x) > 12 for x in ids)
    assert any(f"{cut} of 3 prompt+completion texts are longer" in m for m in said), said


# -- resolving -----------------------------------------------------------------------------------
def _resolve(*rewards, sets=(), objective="grpo"):
    flags = {"objective": objective, "rewards": list(rewards)}
    return resolve(get_registry(), flags=flags, sets=list(sets))


def test_names_weights_and_options(reward_dir, other_reward_dir):
    spec = _resolve(
        f"model:{reward_dir}=0.5",
        f"model:{other_reward_dir}",
        "addition",
        sets=["reward.rm.batch_size=4"],
    )
    assert [(c.name, c.weight) for c in spec.rewards] == [
        ("rm", 0.5),
        (other_reward_dir.name, 1.0),
        ("addition", 1.0),
    ]
    assert spec.rewards[0].options.batch_size == 4
    assert spec.rewards[1].options.batch_size == 32
    assert spec.rewards[0].label == f"reward model {reward_dir}"
    assert reward_name("runs/rm/checkpoints/step-20") == "rm-step-20"


def test_a_path_may_hold_an_equals_sign(reward_dir, tmp_path):
    path = tmp_path / "lr=0.1"
    shutil.copytree(reward_dir, path)
    (alone,) = _resolve(f"model:{path}").rewards
    (weighted,) = _resolve(f"model:{path}=3").rewards
    assert (alone.name, alone.weight, weighted.name, weighted.weight) == ("lr=0.1", 1, "lr=0.1", 3)


def test_a_config_files_reward_mapping_takes_a_model(reward_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"objective: grpo\nrewards: {{'model:{reward_dir}': 2, addition: 1}}\n"
        "reward:\n  rm:\n    batch_size: 8\n"
    )
    spec = resolve(get_registry(), config_file=str(config))
    assert [(c.name, c.weight) for c in spec.rewards] == [("rm", 2.0), ("addition", 1.0)]
    assert spec.rewards[0].options.batch_size == 8


def _two_labels(tokenizer, tmp_path):
    return _reward_model(tmp_path / "two", tokenizer, num_labels=2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, t, m: f"{d}/rm/fnal", r"--reward: reward model .*/rm/fnal: no such directory"),
        (lambda d, t, m: str(m), "architecture is LlamaForCausalLM, not a sequence-class"),
        (lambda d, t, m: str(_two_labels(t, d)), "gives 2 labels; a reward model has one"),
        (lambda d, t, m: str(m / "config.json"), "not a directory"),
        (lambda d, t, m: str(d), "no config.json: not a model directory"),
        (lambda d, t, m: "", "model: needs a directory"),
        (lambda d, t, m: f"{m}=lots", "the weight after '=' must be a number"),
    ],
    ids=["missing", "causal-lm", "two-labels", "file", "no-config", "empty", "weight"],
)
def test_bad_reward_models_are_refused_at_resolve(make, message, tmp_path, tokenizer, model_dir):
    with pytest.raises(ConfigError, match=message):
        _resolve(f"model:{make(tmp_path, tokenizer, model_dir)}")


@pytest.mark.parametrize(
    "task, message",
    [
        ("SEQ_CLS", r"a reward model's LoRA adapter .*align merge .*/adapter --output DIR"),
        ("CAUSAL_LM", r"adapter of task type CAUSAL_LM, not a reward model's .*reward-model"),
    ],
)
def test_a_lora_adapter_is_refused_with_what_to_do(task, message, tmp_path):
    """A reward model trained with --lora leaves an adapter: merged, it is a reward model; a
    language model's adapter merged is still a language model, which merging cannot help."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"task_type": task}))
    with pytest.raises(ConfigError, match=message):
        _resolve(f"model:{adapter}")


def test_pickled_weights_and_a_missing_tokenizer_are_refused(reward_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(reward_dir, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ConfigError, match="no .safetensors weights"):
        _resolve(f"model:{pickled}")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(reward_dir / name, bare / name)
    with pytest.raises(ConfigError, match="no tokenizer"):
        _resolve(f"model:{bare}")


def test_a_causal_lm_without_architectures_is_refused_at_load(model_dir, tmp_path):
    """A config that names no architecture passes resolve; the missing score head stops it."""
    path = tmp_path / "anon"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    config.pop("id2label", None)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="2 labels"):  # transformers' default of 2
        _resolve(f"model:{path}")
    config["num_labels"] = 1
    (path / "config.json").write_text(json.dumps(config))
    _resolve(f"model:{path}")
    with pytest.raises(ConfigError, match="weights lack score.weight"):
        _loaded(path)


def test_names_and_options_are_checked(reward_dir, tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="reward 'rm' is given twice .a reward model is named"):
        _resolve(f"model:{reward_dir}", f"model:{reward_dir}=2")
    clash = tmp_path / "addition"
    shutil.copytree(reward_dir, clash)
    with pytest.raises(ConfigError, match="'addition' is given twice .a reward model is named"):
        _resolve(f"model:{clash}", "addition")
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        _resolve(f"model:{reward_dir}", sets=["reward.rm.batch_sise=2"])
    with pytest.raises(ConfigError, match=r"reward models are named rm \(reward model "):
        _resolve(f"model:{reward_dir}", sets=["reward.model.batch_size=2"])
    with pytest.raises(ConfigError, match="or model:PATH for a reward model"):
        _resolve("additon")
    with pytest.raises(AlignError, match="--reward: objective 'sft' learns from fixed data"):
        _resolve(f"model:{reward_dir}", objective="sft", sets=["reward.rm.batch_size=2"])


def test_chat_prompts_need_the_reward_tokenizer_to_have_a_template(reward_dir, tmp_path):
    path = tmp_path / "no-template"
    shutil.copytree(reward_dir, path)
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    for template in path.glob("chat_template.*"):
        template.unlink()
    reward = ModelReward(str(path), "no-template")
    chosen = ChosenReward(
        align.Reward("no-template", "", reward, options=ModelRewardOptions),
        1.0,
        ModelRewardOptions(),
        reward.label,
    )
    rewards = RewardSet([chosen], SimpleNamespace(trust_remote_code=False), "p.jsonl")
    rewards.load_models(_device())
    assert rewards.score(PLAIN, PLAIN_ANSWERS, [[1]] * 3, {}, ["line 1"] * 3)[0]  # plain: fine
    with pytest.raises(PluginError, match="tokenizer has no chat template"):
        rewards.score(CHAT, ANSWERS, [[1]] * 3, {}, ["line 1"] * 3)


# -- runs ----------------------------------------------------------------------------------------
def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_grpo_run_on_the_demo_is_scored_by_the_reward_model(reward_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--objective", "grpo", "--model", "demo", "--max-steps", "2"]
    args += ["--batch-size", "4", "--max-completion-length", "6", "--output-dir", str(out)]
    args += ["--reward", f"model:{reward_dir}=0.5", "--reward", "addition"]
    args += ["--set", "reward.rm.batch_size=3", "--set", "grpo.num_generations=2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [r for r in _rows(out) if "rewards/rm/mean" in r]
    assert len(rows) == 2
    for row in rows:
        assert row["reward"] == pytest.approx(
            0.5 * row["rewards/rm/mean"] + row["rewards/addition/mean"], abs=1e-5
        )
        assert row["rewards/rm/std"] > 0  # the model scores the samples differently
    log = (out / "train.log").read_text()
    assert "loaded in" in log and log.count(f"reward model {reward_dir} loaded") == 1
    assert "completions scored in" in log
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["reward"]["rm"] == {"weight": 0.5, "batch_size": 3}


def test_align_train_takes_a_model_reward_with_a_function(reward_dir, tmp_path):
    def short(completions, **kwargs):
        return [-len(align.completion_text(c)) / 10 for c in completions]

    out = tmp_path / "api"
    align.train(
        objective="grpo",
        model="demo",
        rewards=[f"model:{reward_dir}", short],
        reward_weights=[2.0, 1.0],
        max_steps=1,
        batch_size=2,
        max_completion_length=4,
        output_dir=str(out),
        num_generations=2,
    )
    (row,) = [r for r in _rows(out) if "rewards/rm/mean" in r]
    assert row["reward"] == pytest.approx(
        2 * row["rewards/rm/mean"] + row["rewards/short/mean"], abs=1e-5
    )


def test_align_train_refuses_a_loaded_model_as_a_reward(reward_dir, tmp_path):
    """A loaded model is callable, so it was taken for a reward function and failed at the
    first round (``You must specify exactly one of input_ids…``): refused up front."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    with pytest.raises(ConfigError, match=r"rewards\[0\]: a loaded model .* \"model:DIR\""):
        align.train(
            objective="grpo", model="demo", rewards=[model], max_steps=1,
            output_dir=str(tmp_path / "api"),
        )  # fmt: skip
    assert not (tmp_path / "api").exists()


def test_align_rewards_lists_model_rewards():
    text = CliRunner().invoke(cli, ["rewards"]).output
    assert "model:PATH  (align-core)" in text
    assert "--set reward.NAME.batch_size=<int>  (default 32)" in text
    listed = json.loads(CliRunner().invoke(cli, ["rewards", "--json"]).output)["rewards"]
    assert [r["options"][0]["name"] for r in listed if r["name"] == "model:PATH"] == ["batch_size"]
