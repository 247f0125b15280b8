"""Plugin discovery: in-process plugins, clashes, broken plugins, real installed distributions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pip_install_into, pip_wheel_into

import align
from align.errors import PluginError
from align.plugins import PLUGINS_ENV, load_plugins
from align.plugins import registry as plugins_module

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


class EchoPlugin:
    """An in-process plugin: its own objective, loss and a metric for every run."""

    __name__ = "echo-in-process"

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="echo", description="test"))

    @align.hookimpl
    def align_compute_loss(self, batch):
        return "echo-loss"

    @align.hookimpl
    def align_metrics(self):
        return {"echo": (1, 1)}


def test_in_process_registration_and_hook_routing():
    registry = load_plugins(extra=[EchoPlugin()])
    assert {"sft", "echo"} <= set(registry.objectives)
    assert registry.plugins["echo-in-process"].status == "ok"
    echo = registry.objective("echo")
    args = {
        "objective": None,
        "model": None,
        "batch": {},
        "options": None,
        "reference": None,
        "run": None,
    }
    assert registry.call_objective_hook("align_compute_loss", echo, **args) == "echo-loss"
    # The sft objective's loss comes from align-plugin-sft only, never from the echo plugin.
    sft = registry.objective("sft")
    assert sft.plugin.distribution == "align-plugin-sft"
    with pytest.raises(KeyError):  # sft's hook needs a real batch: it was the one called
        registry.call_objective_hook(
            "align_compute_loss", sft, **{**args, "options": sft.item.options()}
        )


def test_duplicate_objective_names_name_both_plugins():
    class Clash:
        __name__ = "clash-in-process"

        @align.hookimpl
        def align_register_objectives(self, register):
            register(align.Objective(name="sft", description="another sft"))

    registry = load_plugins(extra=[Clash()])
    with pytest.raises(
        PluginError, match="registered by both align-plugin-sft and clash-in-process"
    ):
        registry.objective("sft")
    assert "registered more than once" in registry.plugins["clash-in-process"].errors[0]


def test_hook_matching_no_spec_is_reported_with_suggestion():
    class Misspelled:
        __name__ = "misspelled"

        @align.hookimpl
        def align_register_objective(self, register):
            register(align.Objective(name="never", description="x"))

    registry = load_plugins(extra=[Misspelled()])
    info = registry.plugins["misspelled"]
    assert info.status == "error"
    assert "matches no hook spec. Did you mean 'align_register_objectives'?" in info.errors[0]
    assert "never" not in registry.objectives
    assert registry.objective("sft")  # the others still work


def test_failing_registration_and_wrong_type_are_reported():
    class Raises:
        __name__ = "raises"

        @align.hookimpl
        def align_register_objectives(self, register):
            raise RuntimeError("boom")

    class WrongType:
        __name__ = "wrong-type"

        @align.hookimpl
        def align_register_objectives(self, register):
            register("sft2")

    registry = load_plugins(extra=[Raises(), WrongType()])
    assert "registration failed: RuntimeError: boom" in registry.plugins["raises"].errors[0]
    assert "expected align.Objective" in registry.plugins["wrong-type"].errors[0]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("stf", "Did you mean 'sft'?"),
        ("dpo", "provided by align-plugin-dpo: pip install align-plugin-dpo"),
        ("whatever", "Installed objectives: sft."),
    ],
)
def test_unknown_objective(name, expected, monkeypatch):
    monkeypatch.setenv(PLUGINS_ENV, "align-plugin-sft")
    with pytest.raises(PluginError, match="unknown objective") as err:
        load_plugins().objective(name)
    assert expected in str(err.value)


def test_environment_variable_limits_loading(monkeypatch):
    monkeypatch.setenv("ALIGN_PLUGINS", "")
    registry = load_plugins()
    assert registry.plugins == {}
    with pytest.raises(PluginError) as err:
        registry.objective("sft")
    assert "Did you mean 'sft'" not in str(err.value)
    assert "ALIGN_PLUGINS='' limits which plugins load" in str(err.value)
    for value in ("align-plugin-sft", "Align_Plugin.SFT", "sft", "align-plugin-foo, sft"):
        monkeypatch.setenv("ALIGN_PLUGINS", value)
        assert list(load_plugins().plugins) == ["sft"], value


def test_in_process_plugin_named_like_an_entry_point_does_not_replace_it():
    class Named:
        __name__ = "sft"

        @align.hookimpl
        def align_register_objectives(self, register):
            register(align.Objective(name="other", description="x"))

    registry = load_plugins(extra=[Named()])
    assert {"sft", "other"} <= set(registry.objectives)
    assert registry.objective("sft").plugin.distribution == "align-plugin-sft"


def test_a_plugin_whose_registration_fails_runs_no_hooks():
    class Fails:
        __name__ = "fails"

        @align.hookimpl
        def align_register_objectives(self, register):
            raise RuntimeError("boom")

        @align.hookimpl
        def align_prepare_model(self, model):
            return "replaced"

        @align.hookimpl
        def align_metrics(self):
            return {"x": (1, 1)}

    registry = load_plugins(extra=[Fails()])
    assert registry.plugins["fails"].status == "error"
    assert (
        registry.chain_hook(
            "align_prepare_model", "model", "m", tokenizer=None, config=None, sections={}
        )
        == "m"
    )
    assert (
        registry.pm.hook.align_metrics(
            objective=None, model=None, batch=None, output=None, options=None
        )
        == []
    )


def test_wrapper_implementations_of_chained_hooks_are_refused():
    class Wrapper:
        __name__ = "wrapper"

        @align.hookimpl(wrapper=True)
        def align_prepare_model(self, model):
            return (yield)

    registry = load_plugins(extra=[Wrapper()])
    with pytest.raises(PluginError, match="cannot be a hook wrapper"):
        registry.chain_hook(
            "align_prepare_model", "model", "m", tokenizer=None, config=None, sections={}
        )


def test_prepare_model_hooks_chain():
    class Wrap:
        __name__ = "wrap"

        @align.hookimpl
        def align_prepare_model(self, model):
            return ("wrapped", model)

    class Keep:
        __name__ = "keep"

        @align.hookimpl
        def align_prepare_model(self, model, config):
            return None

    registry = load_plugins(extra=[Wrap(), Keep()])
    assert registry.chain_hook(
        "align_prepare_model", "model", "m", tokenizer=None, config=None, sections={}
    ) == ("wrapped", "m")


def _cli(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "align.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory):
    """Four real distributions pip-installed into a target directory."""
    target = tmp_path_factory.mktemp("site")
    pip_install_into(target, *(FIXTURES / name for name in ("echo", "broken", "clash", "future")))
    return target


def test_installed_distributions(installed_plugins, tmp_path, model_dir, write_jsonl):
    env = {**os.environ, "PYTHONPATH": str(installed_plugins)}
    env.pop("ALIGN_PLUGINS", None)
    listing = _cli(["plugins", "--json"], env, tmp_path)
    assert listing.returncode == 1  # errors are shown, and the exit code says so
    plugins = {p["distribution"]: p for p in json.loads(listing.stdout)}
    assert plugins["align-test-plugin-echo"]["status"] == "ok"
    assert plugins["align-test-plugin-echo"]["objectives"] == ["echo"]
    assert plugins["align-test-plugin-echo"]["version"] == "0.0.1"
    assert "ModuleNotFoundError" in plugins["align-test-plugin-broken"]["errors"][0]
    future = plugins["align-test-plugin-future"]
    assert future["status"] == "error" and not future["objectives"] and not future["hooks"]
    assert future["errors"][0].startswith("incompatible: requires align-core>=99, but")
    for dist in ("align-test-plugin-clash", "align-plugin-sft"):
        assert (
            "align-plugin-sft, align-test-plugin-clash" in plugins[dist]["errors"][0]
            or "align-test-plugin-clash, align-plugin-sft" in plugins[dist]["errors"][0]
        )

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1 + 1 =", "completion": " 2."}] * 4)
    common = ["--model", str(model_dir), "--data", str(data), "--max-steps", "2"]
    clash = _cli(["run", "--objective", "sft", *common, "--output-dir", "o1"], env, tmp_path)
    assert clash.returncode == 1
    assert "registered by both" in clash.stderr and "align-test-plugin-clash" in clash.stderr
    assert "Traceback" not in clash.stderr

    echo = _cli(["run", "--objective", "echo", *common, "--output-dir", "o2"], env, tmp_path)
    assert echo.returncode == 0, echo.stderr
    # Every command names the plugins with errors, not only `align plugins`.
    for output in (echo.stderr, _cli(["formats"], env, tmp_path).stderr):
        assert "Warning: plugin align-test-plugin-broken (" in output, output
        assert "is not loaded: " in output and "align-test-plugin-clash" not in output
        assert "ModuleNotFoundError" in output and "`align plugins` lists every" in output
    first = json.loads((tmp_path / "o2" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["echo_rows"] == 4  # a plugin's metric reached the run
    run_info = json.loads((tmp_path / "o2" / "run.json").read_text())
    assert "align-test-plugin-echo==0.0.1" in run_info["requirements"]

    env["ALIGN_PLUGINS"] = ""
    assert "No plugins loaded" in _cli(["plugins"], env, tmp_path).stdout


def test_listing_commands_do_not_import_torch(tmp_path):
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom align.cli import cli\n"
        "for args in (['--help'], ['plugins'], ['objectives'], ['formats'], ['run', '--help']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.stdout.strip() == "False", result.stderr


def test_core_and_plugin_build_wheels(tmp_path):
    pip_wheel_into(tmp_path, ROOT, ROOT / "plugins" / "sft")
    names = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.whl"))
    assert names == ["align_core", "align_plugin_sft"]


class FlagPlugin:
    """A section whose flags clash with a core flag."""

    __name__ = "flag-plugin"

    class Opts(align.Options):
        on: bool = False

    @align.hookimpl
    def align_register_sections(self, register):
        register(
            align.Section(name="flagged", description="x", options=self.Opts, flags={"lr": "on"})
        )


def test_a_section_flag_may_not_shadow_a_core_flag():
    registry = load_plugins(extra=[FlagPlugin()])
    assert "flag --lr is a core flag" in " ".join(registry.plugins["flag-plugin"].errors)
    assert "flagged" not in registry.sections
    with pytest.raises(ValueError, match="flag --x names no option 'missing'"):
        align.Section(name="s", description="x", options=FlagPlugin.Opts, flags={"x": "missing"})


def test_a_preset_is_its_objective_with_overridable_defaults(tmp_path):
    def _yaml_file(text):
        path = tmp_path / f"run{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(text)
        return str(path)

    from align.config import resolve

    registry = load_plugins()
    spec = resolve(registry, None, {"objective": "lora-sft"}, ["lora.r=4"])
    assert spec.objective.item.name == "sft" and spec.preset == "lora-sft"
    assert spec.sections["lora"].enabled and spec.sections["lora"].r == 4
    plain = resolve(registry, None, {"objective": "sft"}, [])
    assert not plain.sections["lora"].enabled
    flagged = resolve(registry, None, {"objective": "dpo"}, [], {"lora": {"enabled": True}})
    assert flagged.sections["lora"].enabled
    off = _yaml_file("objective: lora-sft\nlora:\n  enabled: false\n  r: 4\n")
    spec = resolve(registry, off, {}, [])
    assert not spec.sections["lora"].enabled and spec.sections["lora"].r == 4  # file > preset
    spec = resolve(registry, off, {}, ["lora.r=8"], {"lora": {"enabled": True}})
    assert spec.sections["lora"].enabled and spec.sections["lora"].r == 8  # flags > file
    misplaced = _yaml_file("objective: lora-sft\nlora-sft:\n  normalization: sequence\n")
    with pytest.raises(align.ConfigError, match="put its options in a section named 'sft'"):
        resolve(registry, misplaced, {}, [])


def test_a_preset_of_a_missing_section_is_an_error(monkeypatch):
    from align.config import resolve

    class BadPreset:
        __name__ = "bad-preset"

        @align.hookimpl
        def align_register_objectives(self, register):
            register(align.Preset("x-sft", "x", objective="sft", sections={"nope": {"a": 1}}))

    monkeypatch.setenv(PLUGINS_ENV, "align-plugin-sft")
    registry = load_plugins(extra=[BadPreset()])
    with pytest.raises(align.ConfigError, match="sets section 'nope', which no plugin has"):
        resolve(registry, None, {"objective": "x-sft"}, [])


class Reverser:
    """Data hooks of the selected objective only: reverses the split, marks its batches."""

    __name__ = "reverser"

    @align.hookimpl
    def align_register_objectives(self, register):
        register(align.Objective(name="rev", description="test"))

    @align.hookimpl
    def align_prepare_dataset(self, examples, split, config):
        return [{**e, "split": split, "seed": config.seed} for e in reversed(examples)]

    @align.hookimpl
    def align_build_batch(self, examples, tokenizer):
        batch = align.default_batch("prompt_completion", examples, tokenizer.pad_token_id)
        return {**batch, "order": [e["input_ids"][1] for e in examples]}


def test_data_hooks_reach_only_the_selected_objectives_plugin(tokenizer):
    from align.config import resolve
    from align.plugins.hooks import ObjectiveHooks

    registry = load_plugins(extra=[Reverser()])
    examples = [{"input_ids": [1, i, 2], "completion_mask": [0, 1, 1]} for i in (5, 6, 7)]
    rev = resolve(registry, None, {"objective": "rev", "seed": 3}, [])
    hooks = ObjectiveHooks(registry, rev, tokenizer)
    prepared = hooks.prepare_dataset([dict(e) for e in examples], "eval", rev.config)
    assert [e["input_ids"][1] for e in prepared] == [7, 6, 5]
    assert prepared[0]["split"] == "eval" and prepared[0]["seed"] == 3
    assert hooks.build_batch(prepared)["order"] == [7, 6, 5]
    sft = ObjectiveHooks(registry, resolve(registry, None, {"objective": "sft"}, []), tokenizer)
    unchanged = sft.prepare_dataset([dict(e) for e in examples], "train", rev.config)
    assert [{k: v for k, v in e.items() if k != "index"} for e in unchanged] == examples
    assert "order" not in sft.build_batch(examples)


@pytest.mark.parametrize(
    ("core", "requires", "incompatible"),
    [
        ("0.1.0", ["align-core>=0.1,<0.2"], False),
        ("0.1.0", ["align-core>=99"], True),
        ("0.2.0.dev3", ["align-core>=0.2,<0.3"], False),  # a dev core counts as its release
        ("0+unknown", ["align-core>=0.1,<0.2"], False),  # a source tree is not judged
        ("0.1.0", ["align-core>=99; python_version < '3'"], False),  # a marker that is false
        ("0.1.0", ["torch>=2.4"], False),  # no requirement on the core at all
    ],
)
def test_core_version_ranges(monkeypatch, core, requires, incompatible):
    from types import SimpleNamespace

    monkeypatch.setattr(plugins_module, "core_version", lambda: core)
    problem = plugins_module._core_requirement_problem(SimpleNamespace(requires=requires))
    assert (problem is not None) == incompatible, problem
