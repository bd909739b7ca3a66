"""The proxy's packages import one another one way only: no package (``proxy/<name>/``, or a top-level
module) imports one that imports it back, even through others, type-checking imports and imports
inside functions included. A cycle is how state ends up owned twice (the fleet issue found three)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PROXY = Path(__file__).resolve().parents[1] / "proxy"
PREFIX = "tokentrail.proxy."


def _package(path: Path) -> str:
    parts = path.relative_to(PROXY).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def package_imports() -> dict[str, set[str]]:
    """Each package's (or top-level module's) imports of the other ones."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PROXY.rglob("*.py"):
        mine = _package(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                target = name.removeprefix(PREFIX).split(".")[0] if name.startswith(PREFIX) else ""
                known = (PROXY / target).is_dir() or (PROXY / f"{target}.py").exists()
                if target and target != mine and known:
                    edges[mine].add(target)
    return edges


def _cycle_through(edges: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for target in sorted(edges.get(node, ())):
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def test_no_package_imports_one_that_imports_it_back() -> None:
    edges = package_imports()
    cycles = {tuple(c) for p in edges if (c := _cycle_through(edges, p)) is not None}
    assert not cycles, "import cycles between packages: " + "; ".join(" -> ".join(c) for c in sorted(cycles))


def test_the_check_finds_a_cycle() -> None:
    assert _cycle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert _cycle_through({"a": {"b"}, "b": set()}, "a") is None
