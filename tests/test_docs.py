"""README, the docs site, CONTRIBUTING.md and --help stay true: every option, flag and hook is
documented, the site builds with no broken link, and README stays a front page."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from align.cli import RUN_FLAGS, cli
from align.config import TrainConfig
from align.plugins import hookspecs, install_hint

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
CONTRIBUTING = (ROOT / "CONTRIBUTING.md").read_text()


def test_configuration_page_documents_every_core_option_and_flag():
    for key in TrainConfig.model_fields:
        assert f"`{key}`" in CONFIGURATION, key
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    for name in RUN_FLAGS:
        flag = "--reward" if name == "rewards" else "--" + name.replace("_", "-")  # repeatable
        assert f"`{flag}`" in CONFIGURATION, flag
        assert flag in help_text, flag


def test_readme_is_a_front_page_that_leads_with_the_two_commands_then_the_python_api():
    assert len(README.splitlines()) <= 300
    headings = [line for line in README.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## The two commands", "## Python API"], headings


def test_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, or a page missing from the nav, fails."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "objectives" / "dpo" / "index.html").exists()


def test_docs_pages_link_only_to_files_that_exist():
    """README's links into docs/ (GitHub renders them; mkdocs does not see README)."""
    for target in re.findall(r"\]\(((?:docs/)?[\w/.-]+\.md)(?:#[\w-]+)?\)", README):
        assert (ROOT / target).exists(), target


def test_every_hook_is_documented():
    hooks = [name for name in dir(hookspecs) if name.startswith("align_")]
    assert len(hooks) == 12
    for name in hooks:
        assert getattr(hookspecs, name).__doc__, name
        assert f"`{name}`" in CONTRIBUTING, name


def test_every_hook_has_a_test():
    """Each hook is implemented by a plugin in a test (datasette's rule: no untested hook)."""
    sources = [*ROOT.glob("tests/*.py"), *ROOT.glob("tests/fixtures/*/*/*.py")]
    sources += ROOT.glob("plugins/*/tests/*.py")
    text = "".join(path.read_text() for path in sources)
    for name in [n for n in dir(hookspecs) if n.startswith("align_")]:
        assert f"def {name}(" in text, f"no test implements {name}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in README


def test_plugin_readmes_install_from_a_checkout_until_a_release():
    """No align-plugin-… is on PyPI yet: each README gives the command the CLI's hint gives."""
    for readme in ROOT.glob("plugins/*/README.md"):
        text = readme.read_text()
        dist = f"align-plugin-{readme.parent.name}"
        command = install_hint(dist).rsplit(": ", 1)[1]  # pip install … -e plugins/NAME
        assert f"\n{command} " in text, readme
        assert f"pip install {dist}\n" not in text, readme
