"""``align new-plugin``: the project it writes installs and passes its own conformance test."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import pip_install_into

from align.cli import cli
from align.errors import ConfigError
from align.plugins.scaffold import KINDS, new_plugin


def install_and_test(tmp_path, project):
    """Install the project into a folder of its own and run its tests there; their output."""
    target = tmp_path / "site"
    pip_install_into(target, project)
    env = {**os.environ, "PYTHONPATH": str(target), "ALIGN_CACHE": str(tmp_path / "cache")}
    env.pop("ALIGN_PLUGINS", None)
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project / "tests")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert suite.returncode == 0, suite.stdout[-3000:]
    return suite.stdout


def test_a_new_plugin_installs_and_passes_the_suite(tmp_path):
    result = CliRunner().invoke(cli, ["new-plugin", "my-loss", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    project = tmp_path / "align-plugin-my-loss"
    pyproject = (project / "pyproject.toml").read_text()
    assert 'my-loss = "align_my_loss"' in pyproject and '"align-core>=0.1,<0.2"' in pyproject
    assert 'description = "The my-loss objective for align."' in pyproject
    assert 'test = ["align-core[testing]"]' in pyproject  # pytest, for align.testing
    output = install_and_test(tmp_path, project)
    # packable=True: the packed check runs; skipped: no fields, not on-policy (the KL check)
    assert "10 passed, 2 skipped" in output
    again = CliRunner().invoke(cli, ["new-plugin", "my-loss", "--dir", str(tmp_path)])
    assert again.exit_code == 1 and "already exists" in again.output
    bad = CliRunner().invoke(cli, ["new-plugin", "My Loss", "--dir", str(tmp_path)])
    assert bad.exit_code == 1 and "lower-case letters" in bad.output


def test_a_new_reward_plugin_installs_and_passes_the_reward_suite(tmp_path):
    project = new_plugin("my-reward", tmp_path, kind="reward")
    assert project == tmp_path / "align-plugin-my-reward"
    pyproject = (project / "pyproject.toml").read_text()
    assert 'my-reward = "align_my_reward"' in pyproject
    assert 'description = "The my-reward reward for align."' in pyproject
    module = (project / "align_my_reward" / "__init__.py").read_text()
    assert "align_register_rewards" in module and "align.Reward(" in module
    assert not (project / "align_my_reward" / "loss.py").exists()
    test = (project / "tests" / "test_align_my_reward.py").read_text()
    assert "class TestMyReward(RewardConformance):" in test and 'reward = "my-reward"' in test
    assert "--reward my-reward" in (project / "README.md").read_text()
    output = install_and_test(tmp_path, project)
    assert "6 passed" in output


def test_a_new_format_plugin_installs_and_passes_the_format_suite(tmp_path):
    project = new_plugin("qa-pairs", tmp_path, kind="format")
    pyproject = (project / "pyproject.toml").read_text()
    assert 'qa-pairs = "align_qa_pairs"' in pyproject
    assert 'test = ["align-core[testing]"]' in pyproject
    module = (project / "align_qa_pairs" / "__init__.py").read_text()
    assert "align_register_formats" in module and 'shape="prompt_completion"' in module
    test = (project / "tests" / "test_align_qa_pairs.py").read_text()
    assert "class TestQaPairs(FormatConformance):" in test and 'format = "qa-pairs"' in test
    output = install_and_test(tmp_path, project)
    assert "6 passed" in output


def test_the_kinds_and_an_unknown_kind():
    assert list(KINDS) == ["objective", "reward", "format"]
    with pytest.raises(ConfigError, match="plugin kind 'metric': use one of objective, reward"):
        new_plugin("x", ".", kind="metric")
