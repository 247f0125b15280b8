"""README, CONTRIBUTING.md and --help stay true: every option, flag and hook is documented."""

from pathlib import Path

from click.testing import CliRunner

from align.cli import RUN_FLAGS, cli
from align.config import TrainConfig
from align.plugins import hookspecs, install_hint

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
CONTRIBUTING = (ROOT / "CONTRIBUTING.md").read_text()


def test_readme_documents_every_core_option_and_flag():
    for key in TrainConfig.model_fields:
        assert f"`{key}`" in README, key
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    for name in RUN_FLAGS:
        flag = "--reward" if name == "rewards" else "--" + name.replace("_", "-")  # repeatable
        assert f"`{flag}`" in README, flag
        assert flag in help_text, flag


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
