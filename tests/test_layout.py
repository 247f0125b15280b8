"""The core's layout: sub-packages by the path data takes, and no import circles between its
modules (counting imports inside functions, which only hide a circle until it bites)."""

import ast
from pathlib import Path

CORE = Path(__file__).parent.parent / "core"
PACKAGES = {
    "data",
    "model",
    "reference",
    "loop",
    "plugins",
    "rollout",
    "tools",
    "demo",
    "comparison",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        if name == "":
            package = []
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                full = f"{target}.{alias.name}".strip(".")
                found = full if full in modules else target
                if found in modules and found != name:
                    graph[name].add(found)
    return graph


def test_the_core_is_laid_out_in_sub_packages():
    top = {p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top == PACKAGES
    flat = sorted(p.stem for p in CORE.glob("*.py"))
    # the public surface (align.train, options, aliases, errors, the plugin-facing shims) and the
    # run's configuration; the rest lives in the sub-packages
    assert len(flat) <= 13, flat


def test_no_import_circles():
    graph = _imports()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
