"""Refuse to release unless the tag (``v0.1.0``) is the version of every distribution.

Usage: ``python .github/check_versions.py v0.1.0`` from the repository root.
"""

import re
import sys
from pathlib import Path


def mismatches(tag: str, root: Path) -> list[str]:
    """Every pyproject.toml (the root's and each plugin's) whose version is not the tag's."""
    wanted = tag.removeprefix("v")
    found = []
    for path in [root / "pyproject.toml", *sorted(root.glob("plugins/*/pyproject.toml"))]:
        match = re.search(r'^version = "([^"]+)"', path.read_text(encoding="utf-8"), re.MULTILINE)
        version = match.group(1) if match else None
        if version != wanted:
            found.append(f"{path.relative_to(root)}: version {version}, tag {tag}")
    return found


if __name__ == "__main__":
    problems = mismatches(sys.argv[1], Path.cwd())
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)
