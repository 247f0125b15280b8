"""Strict configuration: defaults < YAML file < flags and --set; unknown keys suggest a fix."""

import pytest

import align
from align.config import parse_set, resolve
from align.errors import ConfigError, PluginError
from align.plugins import load_plugins


class LoraLike:
    """A model-preparation plugin with its own config section."""

    __name__ = "lora-like"

    class Opts(align.Options):
        r: int = 8
        target_modules: list[str] | str = "all-linear"

    @align.hookimpl
    def align_register_sections(self, register):
        register(
            align.Section(
                name="lora", description="test section", options=self.Opts, flags={"rank": "r"}
            )
        )


@pytest.fixture(autouse=True)
def only_sft(monkeypatch):
    """These tests bring a stand-in ``lora`` section; the real LoRA plugin would clash with it."""
    monkeypatch.setenv("ALIGN_PLUGINS", "align-plugin-sft")


@pytest.fixture
def registry():
    return load_plugins(extra=[LoraLike()])


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_file_then_flags_then_set(registry, tmp_path):
    config = _yaml(
        tmp_path, "lr: 0.001\nmax_steps: 5\nsft:\n  normalization: sequence\nlora:\n  r: 4\n"
    )
    spec = resolve(registry, config, {"max_steps": 7, "lr": None}, ["lora.r=32"])
    assert spec.config.lr == 0.001 and spec.config.max_steps == 7
    assert spec.options.normalization == "sequence"
    assert spec.sections["lora"].r == 32
    spec = resolve(
        registry, config, {}, ["normalization=token", "lora.target_modules=[q_proj, v_proj]"]
    )
    assert spec.options.normalization == "token"
    assert spec.sections["lora"].target_modules == ["q_proj", "v_proj"]
    assert spec.as_dict()["sft"] == {"normalization": "token"}


def test_set_values_are_yaml_scalars_never_evaluated():
    parsed = parse_set(["a=3", "b=0.1", "c=true", "d=hello", "s.e=[1, 2]", "f=__import__('os')"])
    assert parsed == {
        None: {"a": 3, "b": 0.1, "c": True, "d": "hello", "f": "__import__('os')"},
        "s": {"e": [1, 2]},
    }
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set(["novalue"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("max_step: 3\n", "unknown key 'max_step'. Did you mean 'max_steps'?"),
        ("lora:\n  rank: 3\n", "section 'lora': unknown option 'rank'"),
        ("sft:\n  normalisation: token\n", "Did you mean 'normalization'?"),
        ("lr: fast\n", "option 'lr': Input should be a valid number"),
        ("- a\n- b\n", "expected a mapping of options, got list"),
        ("lr: [\n", "invalid YAML"),
        ("sft: 3\n", "section 'sft' must be a mapping"),
    ],
)
def test_bad_config_files(registry, tmp_path, text, expected):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        resolve(registry, path)
    assert expected in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["normalisation=token"], "unknown option 'normalisation'. Did you mean 'normalization'?"),
        (["normalization=tokens"], "Input should be 'token' or 'sequence'"),
        (["lroa.r=3"], "unknown section 'lroa'. Did you mean 'lora'?"),
        (["lora.r=many"], "option 'r': Input should be a valid integer"),
    ],
)
def test_bad_set_items(registry, sets, expected):
    with pytest.raises(ConfigError) as err:
        resolve(registry, None, {}, sets)
    assert expected in str(err.value)


def test_bad_flag_values(registry):
    with pytest.raises(ConfigError, match="option 'batch_size': Input should be greater"):
        resolve(registry, None, {"batch_size": 0})


def test_unknown_objective_from_config(registry, tmp_path):
    with pytest.raises(PluginError, match="Did you mean 'sft'"):
        resolve(registry, _yaml(tmp_path, "objective: sfr\n"))


def test_clashing_sections_unload_both_plugins():
    class Twin(LoraLike):
        __name__ = "lora-twin"

    clashing = load_plugins(extra=[LoraLike(), Twin()])
    for name in ("lora-like", "lora-twin"):
        assert "section 'lora' is registered more than once" in clashing.plugins[name].errors[0]
        assert not clashing.pm.is_registered(clashing.plugins[name].obj)
    assert resolve(clashing, None, {}, []).sections == {}
    with pytest.raises(ConfigError, match="unknown section 'lora'.*Plugins with errors: lora-like"):
        resolve(clashing, None, {}, ["lora.r=4"])


def test_reserved_names_are_refused():
    class Reserved:
        __name__ = "reserved"

        class Opts(align.Options):
            x: int = 1

        @align.hookimpl
        def align_register_sections(self, register):
            register(align.Section(name="epochs", description="x", options=self.Opts))
            register(align.Section(name="sft", description="x", options=self.Opts))

    registry = load_plugins(extra=[Reserved()])
    errors = " ".join(registry.plugins["reserved"].errors)
    assert "section 'epochs' has the name of a core option" in errors
    assert "section 'sft' has the name of an objective" in errors
    assert registry.sections == {} and registry.objective("sft")


def test_a_flag_overrides_a_bad_file_value(registry, tmp_path):
    path = _yaml(tmp_path, "lr: -1\n")
    assert resolve(registry, path, {"lr": 1e-3}).config.lr == 1e-3
    with pytest.raises(ConfigError, match="c.yaml: option 'lr'"):
        resolve(registry, path, {})


def test_yaml_no_means_full_precision(registry, tmp_path):
    assert resolve(registry, _yaml(tmp_path, "precision: no\n")).config.precision == "no"


@pytest.mark.parametrize(
    "file_text, flags, sets, section_flags, expected",
    [
        ("batch_size: 4\n", {"batch_size": 0}, [], {}, "--batch-size: option 'batch_size'"),
        ("lora:\n  r: 4\n", {}, ["lora.r=abc"], {}, "--set lora.r=abc: section 'lora': option"),
        ("lora:\n  r: 4\n", {}, [], {"lora": {"r": "abc"}}, "--rank: section 'lora': option"),
        (
            "sft:\n  normalization: token\n",
            {},
            ["normalisation=token"],
            {},
            "--set normalisation=token: options of objective 'sft': unknown option",
        ),
        (
            "sft:\n  normalization: token\n",
            {},
            ["normalization=tokens"],
            {},
            "--set normalization=tokens: options of objective 'sft': option 'normalization'",
        ),
        ("lr: 0.1\n", {}, ["lroa.r=3"], {}, "--set lroa.r=3: unknown section 'lroa'"),
        ("lr: 0.1\n", {}, ["lr=1e-4"], {}, "--set lr=1e-4: 'lr' is a core option; use --lr"),
        ("lr: 0.1\n", {"objective": "sfr"}, [], {}, "--objective: unknown objective 'sfr'"),
        ("ref_model: ./r\n", {}, [], {}, "ref_model (FILE): objective 'sft' uses no reference"),
        ("lora:\n  r: many\n", {}, ["lora.target_modules=[q]"], {}, "FILE: section 'lora'"),
    ],
    ids=[
        "flag",
        "set-section",
        "section-flag",
        "set-unknown",
        "set-objective",
        "set-unknown-section",
        "set-core",
        "objective-flag",
        "file-reference",
        "file-value",
    ],
)
def test_errors_name_where_the_value_came_from(
    registry, tmp_path, file_text, flags, sets, section_flags, expected
):
    """A value from --set, a flag or a section's flag is never blamed on the config file."""
    path = _yaml(tmp_path, file_text)
    with pytest.raises((ConfigError, PluginError)) as err:
        resolve(registry, path, flags, sets, section_flags)
    assert str(err.value).startswith(expected.replace("FILE", path))


def test_paths_expand_the_home_directory(registry):
    config = resolve(registry, None, {"model": "~/m", "data": "~/d.jsonl"}).config
    assert not config.model.startswith("~") and config.model.endswith("/m")
    assert config.data.endswith("/d.jsonl") and not config.data.startswith("~")


def test_missing_config_file(registry, tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve(registry, str(tmp_path / "none.yaml"))


def test_objectives_command_lists_options_and_sections(registry):
    from click.testing import CliRunner

    from align import plugins
    from align.cli import cli

    plugins.reset_registry(registry)
    output = CliRunner().invoke(cli, ["objectives"]).output
    assert "--set normalization=<token|sequence>  (default 'token')" in output
    assert "section lora  (lora-like): test section" in output
    assert "--set lora.r=<int>  (default 8)" in output


def test_resume_in_a_config_file(registry, tmp_path):
    for text, expected in (("resume: true", "latest"), ("resume: latest", "latest"), ("", None)):
        path = tmp_path / "run.yaml"
        path.write_text(text + "\n")
        assert resolve(registry, str(path)).config.resume == expected
