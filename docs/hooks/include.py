"""MkDocs hook: a page line ``<!-- include: PATH -->`` becomes the file at PATH (relative to the
repository root), so a plugin's README and CONTRIBUTING.md are pages of the site without a
second copy. The included file's title is dropped, its headings move one level down, and its
links to the repository's README point at the site's home page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.MULTILINE)
ROOT = Path(__file__).resolve().parents[2]


def _included(path: str, page_depth: int) -> str:
    text = (ROOT / path).read_text(encoding="utf-8")
    lines, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("# "):
            continue  # the page has its own title
        if not fence and line.startswith("#"):
            line = "#" + line
        lines.append(line)
    up = "../" * page_depth
    text = "\n".join(lines)
    text = re.sub(r"\]\((\.\./)*README\.md\)", f"]({up}index.md)", text)
    text = text.replace("](CONTRIBUTING.md)", f"]({up}contributing.md)")
    return text


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    depth = page.file.src_uri.count("/")
    return INCLUDE.sub(lambda match: _included(match.group(1), depth), markdown)
