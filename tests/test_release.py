"""What a release publishes works: every distribution (align-core and each plugins/*) builds a
wheel, the wheels install into a fresh virtual environment, and the `align` command installed
from them finds every first-party objective. Until the first release, the install hints give
the command that works from a source checkout."""

import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

from align.plugins import (
    FIRST_PARTY_FLAGS,
    FIRST_PARTY_OBJECTIVES,
    FIRST_PARTY_REQUIRES,
    FIRST_PARTY_SECTIONS,
    install_hint,
)

ROOT = Path(__file__).parent.parent
RELEASE_WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
PROJECTS = [ROOT, *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))]
# Outside a git checkout, the derived and local files left out of the copy that is built.
NOT_SOURCE = (".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*_cache")
BUILD_SDIST = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
# Run in the new environment: where align and each module an `align` entry point names come
# from, and which demo data files align-core's wheel holds.
WHERE_FROM = """
import importlib, json
from importlib import metadata, resources
import align
found = {"align-core": align.__file__}
for entry in metadata.entry_points(group="align"):
    found[entry.dist.name] = importlib.import_module(entry.module).__file__
demo = sorted(p.name for p in resources.files("align.demo").iterdir() if p.name.endswith(".jsonl"))
print(json.dumps({"files": found, "demo": demo}))
"""


def _project(path: Path) -> tuple[str, list[str]]:
    """A project's distribution name and its first-party dependencies."""
    text = (path / "pyproject.toml").read_text(encoding="utf-8")
    name = re.search(r'^name = "([^"]+)"', text, re.MULTILINE).group(1)
    dependencies = re.search(r"^dependencies = \[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    first_party = re.findall(r'"(align-plugin-[a-z-]+?)[<>=~!;\[" ]', dependencies.group(1))
    return name, first_party


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _copy_source(target: Path) -> None:
    """The files a release is built from: tracked and not-ignored ones in a git checkout (no
    model folder or run someone keeps in the tree), else the tree less ``NOT_SOURCE``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
    )
    if listed.returncode != 0:
        shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(*NOT_SOURCE))
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def test_every_distribution_builds_installs_and_provides_its_objectives(tmp_path):
    """As the release workflow (`python -m build`): an sdist of every project, a wheel built
    from each unpacked sdist, so a file missing from an sdist fails here, not on release."""
    source = tmp_path / "source"  # a copy: nothing stale from the tree, and no build/ left in it
    _copy_source(source)
    env = {**os.environ, "PYTHONNOUSERSITE": "1", "ALIGN_CACHE": str(tmp_path / "cache")}
    for name in ("ALIGN_PLUGINS", "PYTHONPATH"):  # as a user runs it: every plugin loads
        env.pop(name, None)
    sdists, unpacked, wheels = tmp_path / "sdists", tmp_path / "unpacked", tmp_path / "wheels"
    for project in PROJECTS:
        _run(
            [sys.executable, "-c", BUILD_SDIST, str(sdists)],
            env,
            source / project.relative_to(ROOT),
        )
    for sdist in sdists.glob("*.tar.gz"):
        with tarfile.open(sdist) as archive:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.10.12+
            archive.extractall(unpacked, **safe)
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    _run([*build, *map(str, sorted(unpacked.iterdir()))], env, tmp_path)
    names = sorted(_project(p)[0] for p in PROJECTS)
    expected = [n.replace("-", "_") for n in names]
    wheel_files = sorted(wheels.glob("*.whl"))
    assert sorted(s.name.split("-")[0] for s in sdists.glob("*.tar.gz")) == expected
    assert sorted(w.name.split("-")[0] for w in wheel_files) == expected

    # A fresh venv (with the pip that ships with Python, offline) that sees this environment's
    # site-packages after its own, as plain paths: the wheels' packages come first, and this
    # environment's .pth files (its editable installs of align) never run.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env, tmp_path)
    scripts = venv / ("Scripts" if os.name == "nt" else "bin")
    python, align = str(scripts / "python"), str(scripts / "align")
    show_purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(_run([python, "-c", show_purelib], env, tmp_path).stdout.strip())
    (purelib / "zz-parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    _run([*install, *map(str, wheel_files)], env, tmp_path)

    found = json.loads(_run([python, "-c", WHERE_FROM], env, tmp_path).stdout)
    assert found["demo"] == sorted(p.name for p in (ROOT / "core" / "demo").glob("*.jsonl"))
    ours = {dist: file for dist, file in found["files"].items() if dist in names}
    assert sorted(ours) == names
    for dist, file in ours.items():
        assert Path(file).is_relative_to(purelib), f"{dist}: imported from {file}, not its wheel"

    plugins = json.loads(_run([align, "plugins", "--json"], env, tmp_path).stdout)
    loaded = {p["distribution"]: p for p in plugins if p["distribution"] in names}
    assert sorted(loaded) == [name for name in names if name != "align-core"]  # every plugin
    assert all(p["status"] == "ok" and p["version"] for p in loaded.values()), loaded
    listed = json.loads(_run([align, "objectives", "--json"], env, tmp_path).stdout)
    objectives = {item["name"]: item["distribution"] for item in listed}
    assert {name: objectives.get(name) for name in FIRST_PARTY_OBJECTIVES} == FIRST_PARTY_OBJECTIVES


def test_install_hints_give_the_command_that_works_from_a_checkout():
    projects = {_project(p)[0]: p for p in PROJECTS[1:]}
    named = {*FIRST_PARTY_OBJECTIVES.values(), *FIRST_PARTY_SECTIONS.values()}
    named |= {*FIRST_PARTY_FLAGS.values(), *FIRST_PARTY_REQUIRES}
    assert named <= projects.keys()
    for dist in named:
        hint = install_hint(dist)
        assert f"pip install {dist} once it is released (it is not on PyPI yet)" in hint
        requires = _project(projects[dist])[1]
        assert FIRST_PARTY_REQUIRES.get(dist, []) == requires, dist
        editable = [f"-e {(projects[d]).relative_to(ROOT).as_posix()}" for d in [*requires, dist]]
        assert hint.endswith(f"from a source checkout of align: pip install {' '.join(editable)}")


def test_the_release_workflow_builds_every_distribution_of_the_tagged_version():
    workflow = yaml.safe_load(RELEASE_WORKFLOW.read_text(encoding="utf-8"))
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML reads the key `on` as true
    steps = workflow["jobs"]["build"]["steps"]
    script = "\n".join(step.get("run", "") for step in steps)
    assert "for project in . plugins/*/; do" in script and "python -m build" in script
    publish = workflow["jobs"]["publish"]
    assert publish["permissions"] == {"id-token": "write"}
    assert publish["steps"][-1]["uses"] == "pypa/gh-action-pypi-publish@release/v1"

    check = [sys.executable, str(ROOT / ".github" / "check_versions.py")]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    tagged = subprocess.run([*check, f"v{version.group(1)}"], cwd=ROOT, capture_output=True)
    assert tagged.returncode == 0, tagged.stderr
    other = subprocess.run([*check, "v99.0.0"], cwd=ROOT, capture_output=True, text=True)
    assert other.returncode == 1
    assert len(other.stderr.splitlines()) == len(PROJECTS)
