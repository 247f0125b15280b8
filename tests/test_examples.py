"""The example plugins of examples/ (weighted_sft: a record field of its own; listwise: the
core's ranked format; alpaca: a data format of its own, which the first-party sft trains on;
keyword_reward: a reward function)
round-trip as wheels: built, installed into one fresh virtual environment beside the core,
tested there with their own tests (the conformance suite included), and trained by `align run`,
padded and packed alike (the reward by GRPO, from the environment the tests run in)."""

import json
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
# example folder -> (distribution, objective)
EXAMPLES = {
    "weighted_sft": ("align-plugin-weighted-sft", "weighted-sft"),
    "listwise": ("align-plugin-listwise", "listwise"),
    "alpaca": ("align-plugin-alpaca", None),  # a format: --objective sft reads it
    "keyword_reward": ("align-plugin-keyword-reward", None),  # a reward: --reward keyword
}
TIMEOUT = 600

DATA = {
    "weighted-sft": [
        {"prompt": "What is 1 + 2? ", "completion": "3.", "weight": 2.5},
        {"prompt": "What is 10 + 20? ", "completion": "10 + 20 = 30. ok ok"},
        {"prompt": "What is 3 + 4? ", "completion": "No idea at all.", "weight": 0},
        {"prompt": "What is 7 + 30? ", "completion": "7 + 30 = 37.", "weight": 0.5},
    ],
    "listwise": [
        {"prompt": "What is 1 + 2? ", "completions": ["3.", "No.", "4?"], "scores": [2, 0, 1]},
        {"prompt": "What is 10 + 20? ", "completions": ["30.", "10 + 20 = 31."], "ranks": [1, 2]},
        {
            "prompt": "What is 3 + 4? ",
            "completions": ["7.", "8.", "No.", "3 + 4 = 7. ok"],
            "scores": [1.0, 0.5, 0.5, 1.0],  # ties: ranked in record order
        },
        {"prompt": "What is 7 + 30? ", "completions": ["No.", "37.", "37. ok"], "ranks": [3, 1, 2]},
    ],
    "alpaca": [
        {"instruction": "Add the two numbers.", "input": "1 + 2", "output": "1 + 2 = 3."},
        {"instruction": "Name a primary colour.", "output": "Blue."},
        {"instruction": "Add the two numbers.", "input": "10 + 20", "output": "30. ok"},
        {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    ],
    "keyword": [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "keyword": str(a + b)}
        for a, b in [(1, 2), (10, 20), (3, 4), (7, 30)]
    ],
}


def _python(venv: Path) -> str:
    return str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")


def _run(args, env, cwd):
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """One fresh virtual environment with the three example wheels (no dependencies: the core
    and torch come from this environment); its python and the environment to run it with."""
    for dist, _ in EXAMPLES.values():
        try:
            metadata.version(dist)
            pytest.skip(f"{dist} is installed here; the round trip needs it absent")
        except metadata.PackageNotFoundError:
            pass
    tmp = tmp_path_factory.mktemp("examples")
    # No user site-packages and no plugin filter: only this environment and the new one.
    env = {**os.environ, "ALIGN_CACHE": str(tmp / "cache"), "PYTHONNOUSERSITE": "1"}
    env.pop("ALIGN_PLUGINS", None)
    sources = []
    for name in EXAMPLES:  # build from copies: nothing stale from the source tree
        source = tmp / "src" / name
        ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        shutil.copytree(ROOT / "examples" / name, source, ignore=ignore)
        sources.append(source)
    wheels = tmp / "wheels"
    pip_wheel_into(wheels, *sources)
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], env, tmp)
    python = _python(venv)
    site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, tmp
    ).stdout.strip()
    here = sysconfig.get_paths()["purelib"]  # the core and torch, with their .pth files
    Path(site, "align-parent.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    built = sorted(str(w) for w in wheels.glob("*.whl"))
    assert len(built) == len(EXAMPLES), built
    _run([python, "-m", "pip", "install", "-q", "--no-deps", *built], env, tmp)
    return python, env, tmp


def test_a_reward_plugin_is_at_most_15_lines():
    package = ROOT / "examples" / "keyword_reward" / "align_keyword_reward"
    lines = sum(len(p.read_text().splitlines()) for p in package.rglob("*.py"))
    assert 0 < lines <= 15, lines


def test_weighted_sft_is_at_most_30_lines_of_python():
    package = ROOT / "examples" / "weighted_sft" / "align_weighted_sft"
    lines = sum(len(p.read_text().splitlines()) for p in package.rglob("*.py"))
    assert 0 < lines <= 30, lines


@pytest.mark.parametrize(
    "path",
    [
        "weighted_sft/align_weighted_sft/__init__.py",
        "alpaca/align_alpaca/__init__.py",
        "keyword_reward/align_keyword_reward/__init__.py",
    ],
)
def test_contributing_shows_the_examples_code_as_it_is(path):
    """The walkthroughs in CONTRIBUTING.md hold each file whole, under a `# <package>/<file>`
    line."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    code = (ROOT / "examples" / path).read_text()
    assert f"```python\n# {path.split('/', 1)[1]}\n{code}```\n" in text


class Started:
    """A command started in the background, its output going to files."""

    def __init__(self, args: list[str], env: dict, cwd: Path, name: str) -> None:
        self.stdout, self.stderr = cwd / f"{name}.out", cwd / f"{name}.err"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=err)

    def result(self) -> str:
        """Wait for it; its stdout, once it exited 0."""
        self.process.wait(timeout=TIMEOUT)
        stdout, stderr = self.stdout.read_text(), self.stderr.read_text()
        assert self.process.returncode == 0, stdout[-3000:] + stderr[-3000:]
        return stdout


@pytest.fixture(scope="module")
def started(venv, model_dir):
    """Everything the round trip checks, started at once in the new environment (the runs are short
    and mostly start-up; two cores run them side by side): the examples' own test suites, `align
    plugins`, and two-step runs of each objective, weighted-sft and listwise both packed (the
    default) and with --no-padding-free. Listwise scores against another reference model, so
    its rewards at step 1 are not all 0."""
    from align import demo

    python, env, tmp = venv
    tests = [str(ROOT / "examples" / name / "tests") for name in EXAMPLES]
    commands = {
        "suites": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        "plugins": [python, "-m", "align.cli", "plugins"],
    }
    demo.build_demo_model(tmp / "reference", layers=2)  # the same tokenizer, other weights
    model = ["--model", str(model_dir)]
    reference = [*model, "--ref-model", str(tmp / "reference")]
    runs = {  # (objective, packed) -> its flags
        ("weighted-sft", True): model,
        ("weighted-sft", False): [*model, "--no-padding-free"],
        ("listwise", True): reference,
        ("listwise", False): [*reference, "--no-padding-free"],
    }
    keyword = tmp / "keyword.jsonl"
    keyword.write_text("".join(json.dumps(r) + "\n" for r in DATA["keyword"]), encoding="utf-8")
    commands["grpo-keyword"] = [python, "-m", "align.cli", "run", "--objective", "grpo", *model]
    commands["grpo-keyword"] += ["--data", str(keyword), "--reward", "keyword"]
    commands["grpo-keyword"] += ["--set", "num_generations=2", "--max-completion-length", "6"]
    commands["grpo-keyword"] += ["--batch-size", "2", "--max-steps", "2"]
    commands["grpo-keyword"] += ["--output-dir", str(tmp / "grpo-keyword")]
    alpaca = tmp / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in DATA["alpaca"]), encoding="utf-8")
    commands["sft-alpaca"] = [python, "-m", "align.cli", "run", "--objective", "sft", *model]
    commands["sft-alpaca"] += ["--data", str(alpaca), "--batch-size", "2", "--max-steps", "2"]
    commands["sft-alpaca"] += ["--output-dir", str(tmp / "sft-alpaca")]
    for (objective, packed), flags in runs.items():
        data = tmp / f"{objective}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in DATA[objective]), encoding="utf-8")
        out = tmp / f"{objective}-{'packed' if packed else 'padded'}"
        commands[out.name] = [python, "-m", "align.cli", "run", "--objective", objective]
        commands[out.name] += ["--data", str(data), "--batch-size", "2", "--max-steps", "2"]
        commands[out.name] += ["--output-dir", str(out), *flags]
    processes = {}
    try:
        for name, args in commands.items():
            # A cache of its own for each: every run computes its reference log-probs itself.
            own = {**env, "ALIGN_CACHE": str(tmp / f"{name}-cache")}
            processes[name] = Started(args, own, tmp, name)
        yield processes, tmp
    finally:
        for command in processes.values():
            if command.process.poll() is None:
                command.process.kill()
                command.process.wait()


def _run_of(started, objective: str, packed: bool) -> tuple[dict, dict[int, dict]]:
    """A finished run's run.json and its logged steps."""
    processes, tmp = started
    name = f"{objective}-{'packed' if packed else 'padded'}"
    processes[name].result()
    out = tmp / name
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed"
    dist = next(d for d, o in EXAMPLES.values() if o == objective)
    assert info["provided_by"] == dist
    assert info["packed_batches"] is packed
    assert (out / "final" / "model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {row["step"]: row for row in rows if "loss" in row}
    assert sorted(steps) == [1, 2]
    return info, steps


def test_the_examples_installed_pass_their_tests_and_train(started):
    """One test, so that one worker (of `pytest -n`) builds the environment and runs it all."""
    processes, tmp = started
    output = processes["suites"].result()
    assert " passed" in output and "failed" not in output, output[-2000:]
    listing = processes["plugins"].result()
    for dist, _ in EXAMPLES.values():
        assert f"{dist} 0.1.0  [ok]" in listing, listing

    processes["grpo-keyword"].result()  # a third-party reward in a first-party objective
    rows = (tmp / "grpo-keyword" / "metrics.jsonl").read_text().splitlines()
    assert all(0 <= json.loads(r)["rewards/keyword/mean"] <= 1 for r in rows) and len(rows) == 2
    info = json.loads((tmp / "grpo-keyword" / "run.json").read_text())
    assert info["config"]["reward"] == {"keyword": {"weight": 1.0}}
    assert info["data"]["train"]["ignored_columns"] == {}  # the reward reads keyword

    processes["sft-alpaca"].result()  # a third-party format in a first-party objective
    info = json.loads((tmp / "sft-alpaca" / "run.json").read_text())
    assert info["status"] == "completed" and info["provided_by"] == "align-plugin-sft"
    assert info["data"]["train"]["examples"] == len(DATA["alpaca"])
    assert info["data"]["train"]["format"] == "alpaca (detected from its columns)"
    for objective in ("weighted-sft", "listwise"):
        _, packed = _run_of(started, objective, True)
        _, padded = _run_of(started, objective, False)
        assert packed[1].keys() == padded[1].keys()
        for name, value in packed[1].items():
            if name != "num_tokens_computed":  # a packed group computes its prompt once
                expected = pytest.approx(padded[1][name], rel=1e-5, abs=1e-5)
                assert value == expected, f"{objective}: {name} at step 1"
        assert packed[2]["loss"] == pytest.approx(padded[2]["loss"], rel=1e-3), objective
        if objective == "listwise":
            assert packed[1]["rewards/margins"] != 0  # the reference is not the policy
