"""``align new-plugin``: the project it writes installs and passes its own conformance test."""

import os
import subprocess
import sys

from click.testing import CliRunner
from conftest import pip_install_into

from align.cli import cli


def test_a_new_plugin_installs_and_passes_the_suite(tmp_path):
    result = CliRunner().invoke(cli, ["new-plugin", "my-loss", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    project = tmp_path / "align-plugin-my-loss"
    pyproject = (project / "pyproject.toml").read_text()
    assert 'my-loss = "align_my_loss"' in pyproject and '"align-core>=0.1,<0.2"' in pyproject
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
    assert "10 passed, 1 skipped" in suite.stdout  # packable=True: the packed check runs; no fields
    again = CliRunner().invoke(cli, ["new-plugin", "my-loss", "--dir", str(tmp_path)])
    assert again.exit_code == 1 and "already exists" in again.output
    bad = CliRunner().invoke(cli, ["new-plugin", "My Loss", "--dir", str(tmp_path)])
    assert bad.exit_code == 1 and "lower-case letters" in bad.output
