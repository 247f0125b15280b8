"""Engine settings checked before training: the DeepSpeed config against align's options
(completed so P processes × batch b still train as one process × batch P·b), and a resumed
run's engine against the one it trained under. The runs themselves: tests/test_scale_out.py."""

import re
from types import SimpleNamespace

import pytest

from align.errors import ConfigError
from align.loop import zero


def _accelerator(config, zero3_init_flag=False, processes=2):
    plugin = SimpleNamespace(deepspeed_config=config, zero3_init_flag=zero3_init_flag)
    return SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=plugin),
        num_processes=processes,
        is_main_process=True,
        gradient_accumulation_steps=1,
    )


def _cfg(batch_size=4, grad_accum=2, max_grad_norm=1.0):
    return SimpleNamespace(
        batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=max_grad_norm
    )


def test_auto_values_are_taken_from_align():
    config = {
        "zero_optimization": {"stage": 3},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    accelerator = _accelerator(config, processes=3)
    zero.configure(accelerator, _cfg(), on_policy=False)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 4 * 2 * 3
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert accelerator.gradient_accumulation_steps == 2


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"gradient_accumulation_steps": 4},
            "gradient_accumulation_steps 4, but align's --grad-accum is 2",
        ),
        ({"train_micro_batch_size_per_gpu": 8}, "--batch-size is 4"),
        ({"train_batch_size": 8}, "--batch-size 4 × --grad-accum 2 × 2 processes is 16"),
        ({"gradient_clipping": 0.5}, "--max-grad-norm is 1.0"),
        ({"optimizer": {"type": "Adam"}}, "has a 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' section"),
        ({"fp16": {"enabled": True}}, "fp16 under DeepSpeed is not supported"),
    ],
)
def test_settings_that_would_change_the_run_are_refused(config, message):
    config = {"zero_optimization": {"stage": 2}, **config}
    with pytest.raises(ConfigError, match=re.escape(message)):
        zero.configure(_accelerator(config), _cfg(), on_policy=False)


def test_untested_stages_zero3_init_and_on_policy_are_refused():
    with pytest.raises(ConfigError, match="stage 1: align runs ZeRO stages 2 and 3"):
        zero.configure(_accelerator({"zero_optimization": {"stage": 1}}), _cfg(), False)
    with pytest.raises(ConfigError, match="zero3_init_flag: true"):
        config = {"zero_optimization": {"stage": 3}}
        zero.configure(_accelerator(config, zero3_init_flag=True), _cfg(), False)
    with pytest.raises(ConfigError, match="on-policy objectives sample completions"):
        zero.configure(_accelerator({"zero_optimization": {"stage": 2}}), _cfg(), True)


def test_deepspeed_on_the_cpu_flag_is_refused(monkeypatch):
    """Accelerate drops DeepSpeed under use_cpu and would train plain DDP without a word."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="asks for DeepSpeed and for the CPU"):
        zero.process_group_backend(cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert zero.process_group_backend(cpu=True) == {}


def test_a_run_resumes_under_the_engine_it_trained_under():
    from align.loop.resume import check_same_engine

    check_same_engine({"engine": "FSDP2"}, "FSDP2")
    check_same_engine({}, "FSDP2")  # a run started before run.json named its engine
    with pytest.raises(ConfigError, match="trained under FSDP2 and this launch runs data-paral"):
        check_same_engine({"engine": "FSDP2"}, "data-parallel (DDP)")


# -- elastic restarts: which run a restarted worker continues ---------------------------------
def _elastic_env(monkeypatch, restart, logs="/tmp/torchelastic_x/job_1"):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", f"{logs}/attempt_{restart}/0/error.json")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")


def _run_dir(tmp_path, job, steps=(), status="failed"):
    import json

    out = tmp_path / "run"
    out.mkdir()
    from align.loop.manifest import write_manifest

    owns = ["run.json", "checkpoints"]
    record = {"status": status, "elastic": job, "written_by": "align-core", "owns": owns}
    (out / "run.json").write_text(json.dumps(record))
    for step in steps:
        checkpoint = out / "checkpoints" / f"step-{step}"
        (checkpoint / "state").mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        write_manifest(checkpoint)
    return out


def _options(out, **changes):
    return SimpleNamespace(
        **{"resume": None, "overwrite": False, "output_dir": str(out), "save_every": 2, **changes}
    )


def test_a_restarted_worker_continues_its_jobs_run_from_the_newest_checkpoint(
    tmp_path, monkeypatch
):
    from align.loop import resume
    from align.loop.setup import prepare_output_dir

    _elastic_env(monkeypatch, 0)
    out = _run_dir(tmp_path, resume.elastic_job(), steps=(2, 4))
    _elastic_env(monkeypatch, 1)
    for options in ({}, {"overwrite": True}, {"resume": str(out / "checkpoints" / "step-2")}):
        chosen = prepare_output_dir(_options(out, **options), "sft")
        chosen.lock.release()
        assert chosen.checkpoint == out / "checkpoints" / "step-4", options
        assert not chosen.replaces_run


def test_a_restart_before_the_first_checkpoint_starts_the_run_again(tmp_path, monkeypatch):
    from align.loop import resume
    from align.loop.setup import prepare_output_dir

    _elastic_env(monkeypatch, 0)
    out = _run_dir(tmp_path, resume.elastic_job())
    _elastic_env(monkeypatch, 1)
    chosen = prepare_output_dir(_options(out), "sft")
    chosen.lock.release()
    assert chosen.checkpoint is None and chosen.replaces_run


def test_a_restarted_worker_never_takes_over_another_jobs_run(tmp_path, monkeypatch):
    from align.loop import resume
    from align.loop.setup import prepare_output_dir

    _elastic_env(monkeypatch, 0, logs="/tmp/torchelastic_y/other_2")
    out = _run_dir(tmp_path, resume.elastic_job(), steps=(2,))
    _elastic_env(monkeypatch, 1)
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_output_dir(_options(out), "sft")


def test_elastic_runs_need_checkpoints_and_one_node(tmp_path, monkeypatch):
    from align.loop.setup import prepare_output_dir

    _elastic_env(monkeypatch, 0)
    with pytest.raises(ConfigError, match="give --output-dir, and leave checkpoints on"):
        prepare_output_dir(_options(tmp_path / "a", save_every=0), "sft")
    with pytest.raises(ConfigError, match="give --output-dir, and leave checkpoints on"):
        prepare_output_dir(_options(tmp_path, output_dir=None, save_every=None), "sft")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="with several nodes"):
        prepare_output_dir(_options(tmp_path / "b"), "sft")


def test_a_tied_weight_is_saved_once_from_a_gathered_state_dict():
    """FSDP's and DeepSpeed's gathered state dicts hold a copy under each name of a tied weight;
    the name ``named_parameters`` does not give is dropped, nothing else."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.loop.checkpoint import _without_aliases

    for tied in (True, False):
        config = LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(config)
        gathered = {name: value.clone() for name, value in model.state_dict().items()}
        kept = _without_aliases(model, gathered)
        assert set(gathered) - set(kept) == ({"lm_head.weight"} if tied else set())
        assert all(torch.equal(kept[name], gathered[name]) for name in kept)
