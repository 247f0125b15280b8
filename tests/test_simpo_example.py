"""examples/simpo, a plugin written from CONTRIBUTING.md alone, round-trips as a wheel: built,
installed into a fresh virtual environment beside the core, tested with the conformance suite,
trained on the embedded demo, uninstalled, and then missed with a helpful error."""

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from conftest import pip_wheel_into

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "simpo"


def _python(venv: Path) -> str:
    return str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")


def _run(args, env, cwd, check=True):
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert not check or result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _align_run(python: str, out: Path) -> list[str]:
    return [
        python,
        "-m",
        "align.cli",
        "run",
        "--objective",
        "simpo",
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
    ]


def test_the_simpo_example_round_trip(tmp_path):
    try:
        metadata.version("align-plugin-simpo")
        pytest.skip("align-plugin-simpo is installed here; the round trip needs it absent")
    except metadata.PackageNotFoundError:
        pass
    # No user site-packages: only this environment and the new one may provide packages.
    env = {**os.environ, "ALIGN_CACHE": str(tmp_path / "cache"), "PYTHONNOUSERSITE": "1"}
    env.pop("ALIGN_PLUGINS", None)
    source = tmp_path / "simpo"  # build from a copy: nothing stale from the source tree
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    wheels = tmp_path / "wheels"
    pip_wheel_into(wheels, source)
    (wheel,) = wheels.glob("align_plugin_simpo-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], env, tmp_path)
    python = _python(venv)
    site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, tmp_path
    ).stdout.strip()
    # The core and torch come from this environment (its .pth files too), not a reinstall.
    here = sysconfig.get_paths()["purelib"]
    Path(site, "align-parent.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], env, tmp_path)

    suite = _run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        env,
        tmp_path,
    )
    assert " passed" in suite.stdout and "failed" not in suite.stdout

    run = _run(_align_run(python, tmp_path / "run"), env, tmp_path)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists(), run.stderr
    listing = _run([python, "-m", "align.cli", "plugins"], env, tmp_path, check=False)
    assert "align-plugin-simpo 0.1.0  [ok]" in listing.stdout

    _run([python, "-m", "pip", "uninstall", "-q", "-y", "align-plugin-simpo"], env, tmp_path)
    gone = _run(_align_run(python, tmp_path / "gone"), env, tmp_path, check=False)
    assert gone.returncode == 1
    assert "unknown objective 'simpo'" in gone.stderr and "Installed objectives:" in gone.stderr
